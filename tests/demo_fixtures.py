"""Shared, cached building blocks for the retrieval tests (notebooks 03/04, the widget demo).

Plain functions, each computed once per pytest session and reused (a module
cache keyed by the session's base temp dir), so every test module can import
them without rebuilding:

* :func:`prepare_sample` — the embedded sample data prepared with a 0.2 / 0.2
  valid / test split (600 photos → 120 test images, 10 categories).
* :func:`train_tiny_checkpoint` — a ``tiny``-preset student trained 3 steps on
  it (any :class:`cnclip_kd.distill.config.TrainConfig` field can be overridden, e.g.
  ``distillation=True, teacher_model_name="random:preset:tiny"``).
* :func:`build_saved_index` — a saved, evaluated index of one checkpoint over
  one split, as notebook 03 writes it.
* :func:`demo_output` — an ``OUTPUT_DIR`` as notebook 02 leaves it (``runs/``
  with a fine-tuned and a distilled tiny student); copy it before writing into it.

Usage in a test module::

    from demo_fixtures import prepare_sample, train_tiny_checkpoint

    @pytest.fixture(scope="module")
    def data_dir(tmp_path_factory):
        return prepare_sample(tmp_path_factory)
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from cnclip_kd import SAMPLE_DATA

_CACHE: dict = {}

#: Runs of :func:`demo_output`: name → training overrides.
DEMO_RUNS = {
    "tiny-finetune": {},
    "tiny-kd-cosine": {"distillation": True, "teacher_model_name": "random:preset:tiny", "kd_loss": "cosine"},
}


def _key(tmp_path_factory, *parts) -> tuple:
    return (str(tmp_path_factory.getbasetemp()),) + tuple(str(p) for p in parts)


def prepare_sample(tmp_path_factory) -> Path:
    """The sample data prepared once per session (images shrunk to 128 px); returns the data folder."""
    from cnclip_kd.data.prepare import prepare_dataset

    key = _key(tmp_path_factory, "sample")
    if key not in _CACHE:
        data_dir = tmp_path_factory.mktemp("sample-data") / "data"
        prepare_dataset(SAMPLE_DATA, data_dir, valid_frac=0.2, test_frac=0.2, max_side=128)
        _CACHE[key] = data_dir
    return _CACHE[key]


def train_tiny_checkpoint(data_dir: str | Path, out_dir: str | Path, name: str, **overrides) -> Path:
    """Train (or reuse) ``out_dir/runs/<name>``: the ``tiny`` preset, 3 steps on ``data_dir``'s train split.

    Returns:
        The run's ``checkpoints/epoch_latest.pt``.
    """
    from cnclip_kd.distill.trainer import train

    key = ("ckpt", str(Path(data_dir).resolve()), str(Path(out_dir).resolve()), name, repr(sorted(overrides.items())))
    if key not in _CACHE or not _CACHE[key].is_file():
        config = {"train_data": str(Path(data_dir) / "lmdb" / "train"), "logs": str(Path(out_dir) / "runs"),
                  "name": name, "preset": "tiny", "max_steps": 3, "batch_size": 32, "warmup": 1,
                  "num_workers": 0, "device": "cpu", **overrides}
        _CACHE[key] = train(config).checkpoint
    return _CACHE[key]


def build_saved_index(checkpoint: str | Path, data_dir: str | Path, index_dir: str | Path, *,
                      split: str = "test", kind: str = "flat") -> Path:
    """Embed ``split`` with ``checkpoint``, build, evaluate and save the index to ``index_dir``; returns it."""
    from cnclip_kd.retrieval.evaluate import index_model
    from cnclip_kd.retrieval.gallery import gallery_from_split

    index_model(checkpoint, gallery_from_split(data_dir, split), index_dir, kind=kind,
                cache_dir=Path(index_dir).parent / "_embeddings" / Path(index_dir).name)
    return Path(index_dir)


def export_towers(checkpoint: str | Path, tmp_path_factory) -> dict:
    """The checkpoint's image and text towers exported to ONNX (fp32), once per session: ``{"image", "text"}`` paths."""
    key = _key(tmp_path_factory, "towers", checkpoint)
    if key not in _CACHE:
        from cnclip_kd.deploy.export import export_onnx, export_text_onnx

        out = tmp_path_factory.mktemp("onnx-towers")
        image = export_onnx(checkpoint, out / "image_encoder.onnx", quantize=False, max_images=8, threads=1)["onnx"]
        text = export_text_onnx(checkpoint, out / "text_encoder.onnx", quantize=False, max_images=8, threads=1)["onnx"]
        _CACHE[key] = {"image": str(image), "text": str(text)}
    return dict(_CACHE[key])


def demo_output(tmp_path_factory) -> Path:
    """An output folder as notebook 02 leaves it: ``runs/`` with the :data:`DEMO_RUNS` students.

    Shared by the session: tests copy it (``shutil.copytree``) before running a
    notebook into it. The prepared data is :func:`prepare_sample`'s (not inside).
    """
    key = _key(tmp_path_factory, "demo-output")
    if key not in _CACHE:
        data_dir = prepare_sample(tmp_path_factory)
        out = tmp_path_factory.mktemp("demo-output")
        for name, overrides in DEMO_RUNS.items():
            train_tiny_checkpoint(data_dir, out, name, **overrides)
        _CACHE[key] = out
    return _CACHE[key]


def copy_output(src: Path, dst: Path) -> Path:
    """Copy an output folder (e.g. :func:`demo_output`) so a test can write into it."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def sample_subset_dataset(root: Path, per_category: int, *, max_side: int = 64):
    """Prepare the first ``per_category`` sample photos of each category under ``root/data`` (60/20/20 split,
    images shrunk to ``max_side``); returns ``(data_dir, report)``."""
    from cnclip_kd.data.prepare import prepare_dataset

    with open(SAMPLE_DATA / "manifest.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    taken: dict[str, int] = {}
    subset = []
    for row in rows:
        if taken.get(row["label"], 0) < per_category:
            taken[row["label"]] = taken.get(row["label"], 0) + 1
            subset.append({**row, "image": str(SAMPLE_DATA / row["image"])})
    manifest = Path(root) / "manifest.csv"
    with open(manifest, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(subset)
    report = prepare_dataset(manifest, Path(root) / "data", valid_frac=0.2, test_frac=0.2, max_side=max_side)
    return Path(root) / "data", report
