"""Stage 1, prepare data: photos + Chinese titles → MUGE files, labels and LMDB, and the readers of the result.

Names load on first use (:func:`cnclip_kd.core.lazy.lazy_face`), so importing this face imports
no torch; the modules below hold the code.
"""

from ..core.lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(__name__, {
    "prepare": ["PrepareReport", "ensure_dataset", "prepare_dataset", "read_source"],
    "dataset": ["SPLITS", "DataError", "LmdbImages", "iter_lmdb_images", "read_labels", "read_split"],
})
