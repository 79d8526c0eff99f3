"""What the quality benchmarks share: mean ± sd cells and printing + saving a report."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def mean_sd(values: list[float]) -> str:
    """``0.123 ± 0.010`` over seeds (one value alone as it is)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def emit(text: str, out: str | None, payload: dict) -> None:
    """Print the Markdown report; with ``out``, also write ``payload`` + the text there as JSON."""
    sys.stdout.write(text + "\n")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**payload, "markdown": text}, ensure_ascii=False, indent=1, default=str),
                        encoding="utf-8")
