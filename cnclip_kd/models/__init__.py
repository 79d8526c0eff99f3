"""The models: cn_clip students and their checkpoints, ModelScope/cn_clip teachers, ImageNet image teachers.

Names load on first use (:func:`cnclip_kd.core.lazy.lazy_face`), so importing this face imports
no torch; the modules below hold the code.
"""

from ..core.lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(__name__, {
    "students": ["PRESETS", "PRETRAINED", "ModelLoadError", "build_model", "image_transform", "load_student",
                 "model_info", "weights_fingerprint"],
    "teachers": ["TEACHERS", "Teacher", "TeacherLoadError", "export_cnclip_teacher", "load_teacher"],
    "image_teachers": ["ImageTeacherError", "is_image_teacher", "load_image_model"],
})
