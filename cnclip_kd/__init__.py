"""cnclip-kd: distil a large Chinese-CLIP teacher into a small student for image retrieval."""

import logging
from pathlib import Path

__version__ = "0.1.0"

#: The embedded sample data (600 CC0 product photos) used when no data is given.
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"

logging.getLogger(__name__).addHandler(logging.NullHandler())
