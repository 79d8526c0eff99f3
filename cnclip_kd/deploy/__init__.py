"""Stage 4, deploy to a CPU: ONNX export and int8, the query-time Retriever, latency, the plan, the HTTP service.

Names load on first use (:func:`cnclip_kd.core.lazy.lazy_face`), so importing this face imports
no torch; the modules below hold the code.
"""

from ..core.lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(__name__, {
    "runtime": ["Retriever", "SearchResult"],
    "backends": ["OnnxEncoder", "OnnxTextEncoder", "TorchEncoder", "load_query_image", "make_encoder",
                 "make_text_encoder"],
    "latency": ["latency_markdown", "measure_latency", "summarize_timings"],
    "export": ["ExportError", "export_onnx", "export_text_onnx", "quantize_image_onnx"],
    "quantize": ["choose_int8", "serving_choice"],
    "planner": ["PlanResult", "plan"],
    "serve": ["BackgroundServer", "create_app"],
})
