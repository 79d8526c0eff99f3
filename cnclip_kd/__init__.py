"""cnclip-kd: distil a large Chinese-CLIP teacher into a small student for image retrieval.

One folder per pipeline stage, each with a face (its ``__init__``) naming what
the notebooks use: :mod:`cnclip_kd.core` (shared building blocks),
:mod:`cnclip_kd.data` (prepare), :mod:`cnclip_kd.models` (students and
teachers), :mod:`cnclip_kd.distill` (training), :mod:`cnclip_kd.retrieval`
(encoders, galleries, indexes, evaluation), :mod:`cnclip_kd.deploy` (ONNX, CPU
serving), :mod:`cnclip_kd.notebook` (figures, widget, records, the demo).
``docs/design.md`` draws the layout.
"""

import logging
from pathlib import Path

__version__ = "0.3.4"

#: The embedded sample data (600 CC0 product photos) used when no data is given.
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"

logging.getLogger(__name__).addHandler(logging.NullHandler())
