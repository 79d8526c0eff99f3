"""Stage 3, retrieval: encoders, galleries, FAISS indexes, live galleries in PostgreSQL + pgvector, evaluation,
the models found on disk, query sessions.

Names load on first use (:func:`cnclip_kd.core.lazy.lazy_face`), so importing this face imports
no torch; the modules below hold the code.
"""

from ..core.lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(__name__, {
    "encoders": ["ImageEncoder", "NoTextTowerError", "TextEncoder", "load_encoder", "load_text_encoder",
                 "text_encoder_for"],
    "gallery": ["Gallery", "embed_gallery", "gallery_from_source", "gallery_from_split", "gallery_texts"],
    "index": ["GalleryIndex", "build_faiss_index", "choose_index_kind"],
    "filters": ["FilterError", "match_mask", "matches", "parse_where"],
    "pgserver": ["EmbeddedPostgres", "EmbeddedPostgresError"],
    "pgvector": ["FingerprintMismatchError", "LiveGalleryView", "PgVectorGallery"],
    "backends": ["default_db_folder", "index_with_backend", "pgvector_table_name", "publish_pgvector"],
    "evaluate": ["chance_p_at_k", "compare_models", "evaluate_index", "evaluate_text", "index_model", "margin_share",
                 "metrics_row", "write_comparison"],
    "discovery": ["discover_models", "latest_checkpoint", "saved_indexes", "spec_name"],
    "report": ["comparison_markdown", "index_markdown", "text_eval_markdown"],
    "session": ["Query", "QueryAnswer", "QuerySession", "SearchResult", "encode_text_query", "load_query_image",
                "results_markdown", "search_embedding", "search_image_query", "search_text_query"],
})
