"""Building blocks every stage shares: files, images, text tokens, metrics, precision, distributed runs.

Names load on first use (:func:`cnclip_kd.core.lazy.lazy_face`), so importing this face imports
no torch; the modules below hold the code.
"""

from .lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(__name__, {
    "files": ["atomic_folder", "atomic_save_npy", "atomic_write_json", "atomic_write_text", "load_stamped", "save_stamped",
              "swap_into_place"],
    "images": ["CLIP_MEAN", "CLIP_STD", "DEFAULT_MAX_PIXELS", "BadImageError", "TooManyPixelsError", "encode_jpeg",
               "fit_max_side", "load_image"],
    "tokenizer": ["CONTEXT_LENGTH", "NoTextTowerError", "QueryError", "check_query", "tokenize"],
    "precision": ["native_bf16", "resolve_precision", "resolve_teacher_precision", "set_torch_threads"],
    "distributed": ["finish_distributed", "init_distributed"],
})
