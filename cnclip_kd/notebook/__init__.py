"""What the notebooks show and record: figures, the query widget, result records, experiments, the demo run.

Names load on first use (:func:`cnclip_kd.core.lazy.lazy_face`), so importing this face imports
no torch; the modules below hold the code.
"""

from ..core.lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(__name__, {
    "viz": ["category_grid", "image_grid", "latency_quality_figure", "plot_history", "save_figure", "top10_figure"],
    "fonts": ["setup_cjk_font"],
    "widget": ["QueryDemo"],
    "records": ["read_records", "record"],
    "experiments": ["compare_kd", "preset_config", "table_markdown", "teacher_markdown", "unlabelled_rows"],
    "demo": ["run_demo"],
})
