"""Stage 2, distil: the training loop, its configuration, KD losses, teacher feature cache and checkpoints.

Names load on first use (:func:`cnclip_kd.core.lazy.lazy_face`), so importing this face imports
no torch; the modules below hold the code.
"""

from ..core.lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(__name__, {
    "trainer": ["train"],
    "config": ["NonFiniteLossError", "TrainConfig", "TrainResult"],
    "losses": ["KD_LOSSES", "DistillationLoss", "build_kd_loss"],
    "checkpoints": ["read_history"],
    "validation": ["encode_split", "evaluate_lmdb", "split_metrics"],
})
