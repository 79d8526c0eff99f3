"""Unlabelled photos in the KD term (``--kd-images``): preparing them, their batches, a tiny run, the CLI flags."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from badinputs import sample_photo, write_text_as_image, write_truncated_jpeg

from cnclip_kd.cli import build_parser
from cnclip_kd.data.dataset import DataError, LmdbImages
from cnclip_kd.distill import unlabelled
from cnclip_kd.distill.config import TrainConfig
from cnclip_kd.distill.losses import DistillationLoss
from cnclip_kd.distill.teacher_cache import TeacherFeatureCache, ViewAugment
from cnclip_kd.distill.trainer import train
from cnclip_kd.distill.unlabelled import (
    check_kd_config,
    kd_image_batches,
    prepare_kd_images,
)
from cnclip_kd.models.teachers import load_teacher

TEACHER = "random:preset:tiny"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A prepared dataset of 4 sample photos per category (64 px): 20 train, 10 valid, 10 test images."""
    from demo_fixtures import sample_subset_dataset

    return sample_subset_dataset(tmp_path_factory.mktemp("kd-images-data"), 4)[0]


@pytest.fixture
def photos(tmp_path) -> Path:
    """3 good photos (2 flat, 1 in a category sub-folder), a truncated JPEG and a text file named .jpg."""
    src = tmp_path / "photos"
    (src / "cat").mkdir(parents=True)
    shutil.copy(sample_photo(0), src / "a.jpg")
    shutil.copy(sample_photo(1), src / "b.jpg")
    shutil.copy(sample_photo(2), src / "cat" / "c.jpg")
    write_truncated_jpeg(src / "cut.jpg")
    write_text_as_image(src / "notes.jpg")
    return src


def test_bad_files_are_skipped_and_reported(photos, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cnclip_kd.distill.unlabelled"):
        kd = prepare_kd_images(photos, tmp_path / "root")
    assert kd.n == 3 and len(LmdbImages(kd.lmdb_dir).ids()) == 3
    assert kd.lmdb_dir.parent == tmp_path / "root" and (kd.lmdb_dir / "imgs" / "data.mdb").is_file()
    listed = json.loads((kd.lmdb_dir / "skipped.json").read_text(encoding="utf-8"))
    assert sorted(Path(s["source"]).name for s in listed) == ["cut.jpg", "notes.jpg"]
    assert sorted(Path(s.source).name for s in kd.skipped) == ["cut.jpg", "notes.jpg"]
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kd-images: skipped")]
    assert len(warned) == 2 and any("cut.jpg" in w for w in warned) and any("notes.jpg" in w for w in warned)
    # No temp folder is left beside the result.
    assert [p.name for p in (tmp_path / "root").iterdir()] == [kd.lmdb_dir.name]


def test_a_manifest_without_titles(photos, tmp_path):
    manifest = tmp_path / "unlabelled.csv"
    manifest.write_text("image\nphotos/a.jpg\nphotos/cat/c.jpg\nphotos/cut.jpg\n", encoding="utf-8")
    kd = prepare_kd_images(manifest, tmp_path / "root")
    assert (kd.n, len(kd.skipped)) == (2, 1)


def test_an_empty_folder_is_a_data_error_naming_it(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(DataError, match="nothing-here.*skipped 0"):
        prepare_kd_images(empty, tmp_path / "root")
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())


def test_a_missing_path_names_it_and_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-such-photos.*lmdb/<split>"):
        prepare_kd_images(tmp_path / "no-such-photos", tmp_path / "root")


def test_a_prepared_split_is_used_as_is(small_data, tmp_path):
    split = small_data / "lmdb" / "valid"
    kd = prepare_kd_images(split, tmp_path / "root")
    assert kd.lmdb_dir == split and kd.n == len(LmdbImages(split).ids()) == 10 and kd.skipped == []
    assert not (tmp_path / "root").exists()  # nothing copied


def test_a_second_call_reuses_the_lmdb(photos, tmp_path, monkeypatch):
    first = prepare_kd_images(photos, tmp_path / "root")
    mtime = (first.lmdb_dir / "imgs" / "data.mdb").stat().st_mtime_ns
    monkeypatch.setattr(unlabelled, "encode_all", lambda *a, **k: pytest.fail("re-encoded"))
    again = prepare_kd_images(photos, tmp_path / "root")
    assert (again.lmdb_dir, again.n, again.skipped) == (first.lmdb_dir, first.n, first.skipped)
    assert (again.lmdb_dir / "imgs" / "data.mdb").stat().st_mtime_ns == mtime


def test_kd_image_batches_are_deterministic_and_cover_every_image():
    n, per_step, steps = 7, 3, 5
    epochs = [kd_image_batches(n, per_step, steps, seed=3, epoch=e, views=2) for e in range(3)]
    assert epochs[0] == kd_image_batches(n, per_step, steps, seed=3, epoch=0, views=2)  # a resume recomputes it
    assert all(len(b) == per_step for e in epochs for b in e) and len(epochs[0]) == steps
    stream = [i for e in epochs for b in e for i, _ in b]
    for start in range(0, len(stream) - n + 1, n):  # each pass over the images shows every one once
        assert sorted(stream[start:start + n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # reshuffled at the wrap
    assert {v for e in epochs for b in e for _, v in b} == {0, 1, 2}
    assert epochs[0] != kd_image_batches(n, per_step, steps, seed=4, epoch=0, views=2)
    assert {v for b in kd_image_batches(n, per_step, steps, 3, 0) for _, v in b} == {0}


def test_a_tiny_run_distils_on_the_unlabelled_photos(small_data, photos, tmp_path, monkeypatch):
    seen = []
    forward = DistillationLoss.forward

    def spy(self, *args, **kwargs):
        seen.append(tuple(kwargs["extra_image_features"].shape) if "extra_image_features" in kwargs else None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DistillationLoss, "forward", spy)
    logs = tmp_path / "runs"
    result = train({"train_data": str(small_data / "lmdb" / "train"), "logs": str(logs), "name": "kd-img",
                    "preset": "tiny", "batch_size": 8, "max_steps": 2, "warmup": 1, "num_workers": 0,
                    "device": "cpu", "seed": 5, "distillation": True, "teacher_model_name": TEACHER,
                    "kd_loss": "relation", "augment_views": 2, "augment_mix": 1.0, "kd_images": str(photos),
                    "kd_images_ratio": 0.5,
                    "teacher_batch_size": 16, "teacher_precision": "fp32"})
    rows = [r for r in result.history if r.get("type") != "val"]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/kd_relation"])) for r in rows)
    assert len(seen) == 2 and all(s is not None and s[0] == 4 for s in seen)  # 0.5 × batch 8 per step
    assert json.loads((result.run_dir / "config.json").read_text())["kd_images"] == str(photos)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert (metrics["kd_images_n"], metrics["kd_images_skipped"]) == (3, 2)

    # The cached teacher feature of an unlabelled (image, view) is the teacher on the very picture the student saw;
    # with augment_mix its views are blends with another of the unlabelled photos.
    kd_lmdb = Path(metrics["kd_images_lmdb"])
    (cache_dir,) = [p for p in (logs / "teacher-cache").iterdir()
                    if json.loads((p / "meta.json").read_text())["lmdb"] == str(kd_lmdb.resolve())]
    cache = TeacherFeatureCache(cache_dir)
    teacher = load_teacher(TEACHER)
    images = LmdbImages(kd_lmdb)
    image_id = images.ids()[1]
    mixer = ViewAugment(mix=1.0)
    assert [mixer.mixing(image_id, v, images.ids())[0] in images.ids() for v in (1, 2)] == [True, True]
    for view in range(3):
        picture = mixer(images.image(image_id), image_id, view, images)
        with torch.no_grad():
            direct = teacher.encode_image(teacher.transform(picture)[None])
        torch.testing.assert_close(cache.lookup(torch.tensor([image_id]), torch.tensor([view])), direct,
                                   rtol=1e-5, atol=1e-5)


def test_cli_flags_and_config_checks():
    args = build_parser().parse_args(["train", "--train-data", "x", "--distillation", "--teacher-model-name", "t",
                                      "--kd-images", "out/data/lmdb/valid", "--kd-images-ratio", "0.25"])
    assert (args.kd_images, args.kd_images_ratio) == ("out/data/lmdb/valid", 0.25)
    defaults = build_parser().parse_args(["train", "--train-data", "x"])
    assert (defaults.kd_images, defaults.kd_images_ratio) == ("", 0.5)
    with pytest.raises(ValueError, match="--distillation"):
        check_kd_config(TrainConfig(train_data="x", kd_images="photos"))
    with pytest.raises(ValueError, match="kd_images_ratio must be > 0"):
        check_kd_config(TrainConfig(train_data="x", kd_images="photos", distillation=True, kd_images_ratio=0))
    check_kd_config(TrainConfig(train_data="x", kd_images="photos", distillation=True))


def test_compare_kd_adds_one_kd_run_per_unlabelled_source(tmp_path):
    from cnclip_kd.notebook.experiments import _compare_runs, preset_config

    base = preset_config("tiny", tmp_path / "data", tmp_path / "out", name="tiny", kd_images="photos")
    assert base.name.startswith("tiny-kdimages-")  # another photo set is another run folder
    runs = _compare_runs(base, ["relation"], True, {"kd-relation + valid photos, unlabelled (inductive)": "v"})
    assert [label for label, _ in runs][-1] == "kd-relation + valid photos, unlabelled (inductive)"
    (_, finetune), (_, kd), (_, extra) = runs
    assert (finetune.distillation, finetune.kd_images) == (False, "")
    assert (kd.distillation, kd.kd_images) == (True, "photos")
    assert (extra.distillation, extra.kd_loss, extra.kd_images) == (True, base.kd_loss, "v")
    assert len({c.name for _, c in runs}) == 3
