"""Notebook 01 and `cnclip-kd prepare` on the embedded sample data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cnclip_kd import SAMPLE_DATA

pytestmark = pytest.mark.notebook


def test_notebook_01_prepares_sample_data(notebook_runner, tmp_path):
    rec = notebook_runner("01_prepare_data.ipynb", {"OUTPUT_DIR": str(tmp_path / "out"), "PER_CATEGORY": 2})
    assert rec["n_images"] == 600
    assert len(rec["categories"]) == 10
    assert {split: sum(c.values()) for split, c in rec["counts"].items()} == {"train": 360, "valid": 120, "test": 120}
    assert rec["skipped"] == []
    data_dir = Path(rec["data_dir"])
    assert data_dir == (tmp_path / "out" / "data").resolve()
    with Image.open(rec["figure"]) as fig:
        assert fig.format == "PNG" and fig.width > 300

    from cn_clip.training.data import LMDBDataset

    ds = LMDBDataset(str(data_dir / "lmdb" / "valid"), split="val")
    image, text, eos = ds[0]
    assert tuple(image.shape) == (3, 224, 224) and len(ds) == 120 and int(text[0]) == 101 and eos > 1


def test_cli_prepare(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cnclip_kd.cli", "prepare", str(SAMPLE_DATA), str(out)],
                          capture_output=True, text=True, check=True)
    assert "600 images, 10 categories, 0 skipped" in proc.stdout
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["n_images"] == 600 and len(report["categories"]) == 10
    # Defaults are 10 % / 10 % of products per category.
    assert sum(report["counts"]["valid"].values()) == 60

    again = subprocess.run([sys.executable, "-m", "cnclip_kd.cli", "prepare", str(SAMPLE_DATA), str(out)],
                           capture_output=True, text=True, check=True)
    assert "(already up to date)" in again.stdout


def test_cli_reports_bad_source_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnclip_kd.cli", "prepare", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
