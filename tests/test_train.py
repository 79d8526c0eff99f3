"""The trainer: cn_clip-format checkpoints, exact resume after SIGKILL, DDP on CPU, teacher cache, NaN stop, errors.

Everything trains the ``tiny`` preset (32 px) on a 80-photo subset of the
sample data (40 train pairs, 20 valid images), on the CPU, without workers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnclip_kd.models import teachers as teachers_mod
from cnclip_kd.distill import trainer as train_mod
from cnclip_kd.cli import build_parser
from cnclip_kd.cli import main as cli_main
from cnclip_kd.models.students import PRESETS, ModelLoadError, build_model, load_student
from cnclip_kd.models.teachers import TEACHERS, Teacher, TeacherLoadError, load_teacher
from cnclip_kd.distill.teacher_cache import LMDBImages, TeacherFeatureCache
from cnclip_kd.distill.config import NonFiniteLossError, TrainConfig
from cnclip_kd.distill.validation import evaluate_lmdb
from cnclip_kd.distill.checkpoints import read_history
from cnclip_kd.distill.losses import DistillationLoss
from cnclip_kd.distill.trainer import train
from teacher_fixtures import make_tiny_clip_teacher_dir, tiny_cnclip_config_files

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
KILL_SCRIPT = TESTS / "scripts" / "train_until_killed.py"

PER_CATEGORY = 8   # photos per category taken from the sample data (10 categories)
N_TRAIN = 40       # after the 0.2 / 0.2 valid / test split: 4 products per category
N_VALID = 20
BATCH = 8          # → 5 steps per epoch
STEPS_PER_EPOCH = N_TRAIN // BATCH
HUB_ID = "damo/multi-modal_clip-vit-large-patch14_zh"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A prepared dataset: 8 photos of each of the 10 sample categories, images shrunk to 64 px."""
    from demo_fixtures import sample_subset_dataset

    data_dir, report = sample_subset_dataset(tmp_path_factory.mktemp("train-data"), PER_CATEGORY)
    assert report.n_images == 10 * PER_CATEGORY
    return data_dir


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny ModelScope CLIP teacher folder (loads through modelscope's Model.from_pretrained)."""
    return make_tiny_clip_teacher_dir(tmp_path_factory.mktemp("tiny-clip") / "teacher")


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> str:
    """A ``random:VISION@TEXT`` teacher of tiny size: no modelscope import, cheap in subprocesses."""
    vision, text = tiny_cnclip_config_files(tmp_path_factory.mktemp("tiny-configs"))
    return f"random:{vision}@{text}"


def _config(data: Path, logs: Path, name: str, **overrides) -> dict:
    cfg = {"train_data": str(data / "lmdb" / "train"), "val_data": str(data / "lmdb" / "valid"),
           "logs": str(logs), "name": name, "preset": "tiny", "batch_size": BATCH, "valid_batch_size": 64,
           "max_epochs": 2, "lr": 1e-3, "warmup": 2, "num_workers": 0, "valid_num_workers": 0,
           "teacher_batch_size": 16, "teacher_precision": "fp32", "device": "cpu", "seed": 7}
    cfg.update(overrides)
    return cfg


def _step_rows(history: list[dict]) -> list[dict]:
    return [r for r in history if r.get("type") != "val"]


def _val_rows(history: list[dict]) -> list[dict]:
    return [r for r in history if r.get("type") == "val"]


def _load(path: Path) -> dict:
    # weights_only=True: the way cn_clip's own torch.load (torch >= 2.6 default) reads it.
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_tensors_equal(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are exactly equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_tensors_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _run_killed(config: dict, tmp_path: Path, **kill) -> subprocess.CompletedProcess:
    """Run ``train(config)`` in a child process that SIGKILLs itself at the given point."""
    path = tmp_path / f"{config['name']}-config.json"
    path.write_text(json.dumps(config))
    (flag, value), = kill.items()
    cmd = [sys.executable, str(KILL_SCRIPT), str(path), "--threads", str(torch.get_num_threads()),
           f"--{flag.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_child_env())
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    return proc


def _assert_same_run(a, b) -> None:
    """Run b ended exactly where run a did: same weights, optimizer, KD projector and history."""
    ca, cb = _load(a.checkpoint), _load(b.checkpoint)
    for key in ("epoch", "step", "epoch_step", "model_info"):
        assert ca[key] == cb[key], key
    _assert_tensors_equal(ca["state_dict"], cb["state_dict"], "state_dict")
    _assert_tensors_equal(ca["optimizer"], cb["optimizer"], "optimizer")
    _assert_tensors_equal(ca["kd_state"], cb["kd_state"], "kd_state")
    ha, hb = read_history(a.run_dir), read_history(b.run_dir)
    steps_b = [r["step"] for r in _step_rows(hb)]
    assert steps_b == list(range(1, ca["step"] + 1)), "steps missing or duplicated after the resume"
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        ra, rb = dict(ra), dict(rb)
        ra.pop("samples_per_s", None), rb.pop("samples_per_s", None)  # wall-clock, differs
        assert ra == rb


# --------------------------------------------------------------------------- a plain run


@pytest.fixture(scope="module")
def plain_run(data, tmp_path_factory):
    """Two epochs, no distillation, validation every epoch, a mid-epoch checkpoint every 2 steps."""
    return train(_config(data, tmp_path_factory.mktemp("plain") / "runs", "plain", save_step_frequency=2))


def test_checkpoint_has_cnclip_keys_and_reloads(plain_run):
    ckpt_dir = plain_run.run_dir / "checkpoints"
    assert plain_run.checkpoint == ckpt_dir / "epoch_latest.pt"
    ckpt = _load(plain_run.checkpoint)
    # cn_clip's keys, as its trainer writes them and its --resume / load_from_name read them.
    assert (ckpt["epoch"], ckpt["step"], ckpt["name"]) == (2, 2 * STEPS_PER_EPOCH, "plain")
    reference = build_model(PRESETS["tiny"]).state_dict()
    sd = ckpt["state_dict"]
    assert all(k.startswith("module.") for k in sd)
    assert {k[len("module."):] for k in sd} == set(reference)
    assert all(sd[f"module.{k}"].shape == v.shape and sd[f"module.{k}"].dtype == v.dtype
               for k, v in reference.items())
    opt = ckpt["optimizer"]
    assert set(opt) == {"state", "param_groups"}
    n_params = len(list(build_model(PRESETS["tiny"]).parameters()))
    assert sum(len(g["params"]) for g in opt["param_groups"]) == n_params
    assert {float(s["step"]) for s in opt["state"].values()} == {float(2 * STEPS_PER_EPOCH)}

    model, info = load_student(plain_run.checkpoint)
    assert info == PRESETS["tiny"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[f"module.{k}"]), k

    # Per-epoch copies: epoch1.pt is the end of epoch 1, epoch2.pt the final state.
    e1 = _load(ckpt_dir / "epoch1.pt")
    assert (e1["epoch"], e1["step"], e1["epoch_step"]) == (1, STEPS_PER_EPOCH, 0)
    assert (ckpt_dir / "epoch2.pt").read_bytes() == plain_run.checkpoint.read_bytes()
    assert any(not torch.equal(e1["state_dict"][k], sd[k]) for k in sd), "epoch 2 did not change the weights"
    assert not list(ckpt_dir.glob("*.tmp")), "a temp file of the atomic save was left behind"


def test_history_metrics_and_lr_schedule(plain_run, data):
    history = read_history(plain_run.run_dir)
    assert plain_run.history == history
    steps = _step_rows(history)
    n = 2 * STEPS_PER_EPOCH
    assert [r["step"] for r in steps] == list(range(1, n + 1))
    assert [r["epoch"] for r in steps] == [1] * STEPS_PER_EPOCH + [2] * STEPS_PER_EPOCH
    for r in steps:
        assert set(r) == {"step", "epoch", "lr", "samples_per_s", "loss/contrastive", "loss/total"}
        assert r["samples_per_s"] > 0
        assert math.isfinite(r["loss/total"]) and r["loss/total"] > 0
        assert r["loss/total"] == r["loss/contrastive"]  # no distillation
    # cn_clip's schedule: linear warm-up over 2 steps, then half-cosine to 0 at the last step.
    base, warmup = 1e-3, 2
    expected = [base * s / warmup if s <= warmup else
                0.5 * (1 + math.cos(math.pi * (s - 1 - warmup) / (n - warmup))) * base for s in range(1, n + 1)]
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-12)
    assert expected[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and expected[-1] < 0.05 * base

    vals = _val_rows(history)
    assert [(r["epoch"], r["step"]) for r in vals] == [(1, STEPS_PER_EPOCH), (2, n)]
    assert plain_run.validation == vals
    for r in vals:
        assert r["val/n_queries"] == N_VALID
        for k in ("val/p@10", "val/map@10", "val/r@1", "val/r@5", "val/r@10"):
            assert 0.0 <= r[k] <= 1.0, k
        assert r["val/r@1"] <= r["val/r@5"] <= r["val/r@10"]
    # The last validation row is the final model's P@10 on the valid split.
    model, _ = load_student(plain_run.checkpoint)
    again = evaluate_lmdb(model, data / "lmdb" / "valid", resolution=32)
    assert again["p@10"] == pytest.approx(vals[-1]["val/p@10"], abs=1e-9)
    assert again["map@10"] == pytest.approx(vals[-1]["val/map@10"], abs=1e-9)

    metrics = json.loads((plain_run.run_dir / "metrics.json").read_text())
    assert (metrics["steps"], metrics["epochs"], metrics["kd_loss"], metrics["teacher"]) == (n, 2, None, None)
    assert metrics["val/p@10"] == vals[-1]["val/p@10"]
    config = json.loads((plain_run.run_dir / "config.json").read_text())
    assert (config["name"], config["preset"], config["batch_size"]) == ("plain", "tiny", BATCH)


@pytest.mark.slow
def test_real_architecture_checkpoint_loads_in_cnclip(data, tmp_path):
    """ViT-B-16 @ RBT3-chinese, one step: cn_clip's own load_from_name reads the checkpoint."""
    import contextlib
    import io

    from cn_clip.clip import load_from_name, tokenize

    result = train(_config(data, tmp_path, "vit-b-16", preset=None, vision_model="ViT-B-16",
                           text_model="RBT3-chinese", batch_size=2, max_steps=1, val_data=None,
                           save_epoch_frequency=0, lr=1e-4, warmup=1))
    try:
        assert result.steps == 1
        ours, info = load_student(result.checkpoint)
        assert info["image_resolution"] == 224 and info["vision_width"] == 768
        with contextlib.redirect_stdout(io.StringIO()):  # cn_clip prints its configs
            theirs, preprocess = load_from_name(str(result.checkpoint), device="cpu", vision_model_name="ViT-B-16",
                                                text_model_name="RBT3-chinese", input_resolution=224)
        ours.eval(), theirs.eval()
        # cn_clip builds in fp16 and casts back to fp32 on the CPU: every weight is ours, rounded to fp16.
        their_sd = theirs.state_dict()
        assert set(their_sd) == set(ours.state_dict())
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(their_sd[k].float(), v.float(), rtol=2e-3, atol=1e-4, msg=k)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, 224, 224, generator=g)
        texts = tokenize(["红色连衣裙", "运动鞋"], context_length=52)
        with torch.no_grad():
            for a, b in ((ours.encode_image(images), theirs.encode_image(images)),
                         (ours.encode_text(texts), theirs.encode_text(texts))):
                assert a.shape == b.shape == (2, 512)
                assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999
                torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2 * float(a.abs().max()))
    finally:
        result.checkpoint.unlink(missing_ok=True)  # 1.5 GB with the optimizer state


# --------------------------------------------------------------------------- another input side (CPU latency)


def test_student_continues_at_a_smaller_input_side(plain_run, data, tmp_path, caplog):
    """--resume a 32 px run at 16 px: position embeddings interpolated, fresh optimizer, 16 px from then on."""
    import logging

    from cnclip_kd.deploy.export import export_onnx

    start, _ = load_student(plain_run.checkpoint)
    old = start.visual.positional_embedding.detach()  # 1 + 4×4 tokens
    with caplog.at_level(logging.INFO, logger="cnclip_kd.distill.trainer"):
        result = train(_config(data, tmp_path, "small-side", resume=str(plain_run.checkpoint), image_resolution=16,
                               max_epochs=1, reset_data_offset=True, save_epoch_frequency=0))
    assert "input side changed to 16; starting a fresh optimizer" in caplog.text
    ckpt = _load(result.checkpoint)
    assert ckpt["model_info"] == {**PRESETS["tiny"], "image_resolution": 16}
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {float(STEPS_PER_EPOCH)}
    model, info = load_student(result.checkpoint)
    assert info["image_resolution"] == 16 and model.visual.positional_embedding.shape == (1 + 2 * 2, 64)
    assert _val_rows(read_history(result.run_dir)), "validation ran at 16 px"

    # The interpolation itself (bicubic, corners aligned): class token and the grid's corners are kept.
    resized, _ = load_student(plain_run.checkpoint, image_resolution=16)
    new = resized.visual.positional_embedding.detach()
    grid_old, grid_new = old[1:].reshape(4, 4, -1), new[1:].reshape(2, 2, -1)
    torch.testing.assert_close(new[0], old[0])
    for (i, j), (a, b) in {(0, 0): (0, 0), (0, 1): (0, 3), (1, 0): (3, 0), (1, 1): (3, 3)}.items():
        torch.testing.assert_close(grid_new[i, j], grid_old[a, b], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert resized.encode_image(torch.zeros(2, 3, 16, 16)).shape == (2, PRESETS["tiny"]["embed_dim"])

    # Everything downstream follows the checkpoint's side: the ONNX encoder takes 16 px.
    report = export_onnx(result.checkpoint, tmp_path / "small.onnx", quantize=False, max_images=20, threads=1)
    assert report["resolution"] == 16 and report["fp32"]["cosine_min"] > 0.999

    # Continuing that run at another side is refused, not silently resized.
    with pytest.raises(ModelLoadError, match="trained at image_resolution 16, not 24"):
        train(_config(data, tmp_path, "small-side", image_resolution=24, max_epochs=2))


@pytest.mark.slow
def test_cnclip_pretrained_name_loads_at_a_smaller_side(tmp_path):
    """`--resume ViT-B-16 --image-resolution 112`: cn_clip's load_from_name reads the file it would have downloaded
    (clip_cn_vit-b-16.pt, cn_clip's release format), then the 14×14 position grid is interpolated to 7×7."""
    from cnclip_kd.models.students import cnclip_state_dict

    torch.manual_seed(0)
    source, info = load_student(None, vision_model="ViT-B-16")
    torch.save({"state_dict": {k: v.half() for k, v in cnclip_state_dict(source).items()}},
               tmp_path / "clip_cn_vit-b-16.pt")
    model, sized = load_student("ViT-B-16", download_root=tmp_path, image_resolution=112)
    assert sized == {**info, "image_resolution": 112} and model.visual.input_resolution == 112
    old, new = source.visual.positional_embedding.detach().half().float(), model.visual.positional_embedding.detach()
    assert new.shape == (1 + 7 * 7, 768)
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[1:].reshape(7, 7, -1)[6, 6], old[1:].reshape(14, 14, -1)[13, 13],
                               rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert model.encode_image(torch.zeros(1, 3, 112, 112)).shape == (1, 512)
    same, _ = load_student("ViT-B-16", download_root=tmp_path)  # no side given: cn_clip's model as it loads it
    assert same.visual.input_resolution == 224


@pytest.mark.parametrize("side, message", [(20, "not a multiple of the patch size 8: use 16 or 24$"),
                                           (4, "not a multiple of the patch size 8: use 8$")])
def test_input_side_must_fit_the_patch_grid(side, message):
    with pytest.raises(ModelLoadError, match=message):
        load_student(None, preset="tiny", image_resolution=side)


def test_resnet_students_change_their_input_side_in_steps_of_32():
    from cnclip_kd.models.students import build_model, load_weights, model_info

    with pytest.raises(ModelLoadError, match="not a multiple of 32 .a CNN's stride.: use 96 or 128"):
        load_student(None, preset="demo-resnet", image_resolution=100)
    model, info = load_student(None, preset="demo-resnet", image_resolution=96)
    assert info["image_resolution"] == 96
    assert tuple(model.visual.attnpool.positional_embedding.shape) == (3 * 3 + 1, 16 * 32)
    assert tuple(model.encode_image(torch.zeros(2, 3, 96, 96)).shape) == (2, 256)

    # Weights trained at 64 px (a 2×2 grid + the pooled token) load at 96 px: the grid is resized, the rest kept.
    small = build_model(model_info(preset="demo-resnet"))
    sd = {f"module.{k}": v.clone() for k, v in small.state_dict().items()}
    grid = torch.arange(4, dtype=torch.float32).repeat_interleave(512).reshape(4, 512)  # cells 0, 1, 2, 3
    sd["module.visual.attnpool.positional_embedding"] = torch.cat([torch.full((1, 512), 7.0), grid])
    big = build_model(info)
    load_weights(big, sd)
    pos = big.visual.attnpool.positional_embedding.detach()
    assert torch.equal(pos[0], torch.full((512,), 7.0))  # the pooled token's own position is not a grid cell
    corners = pos[1:].reshape(3, 3, 512)[[0, 0, -1, -1], [0, -1, 0, -1], 0]
    assert corners.tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-5)  # align_corners keeps the corners
    torch.testing.assert_close(big.visual.layer1[0].conv1.weight, small.visual.layer1[0].conv1.weight)


# --------------------------------------------------------------------------- exact resume after SIGKILL


@pytest.mark.slow
def test_resume_after_sigkill_mid_save_is_exact(data, tmp_path):
    """Killed while writing a checkpoint, rerun: the same weights, optimizer and history as an unbroken run.

    Train-time augmentation draws from torch's and Python's global RNGs, so
    this also checks that the RNG state is saved and restored.
    """
    cfg = _config(data, tmp_path / "runs", "unbroken", use_augment=True, save_step_frequency=2, val_data=None)
    unbroken = train(cfg)
    cfg_b = dict(cfg, name="killed")
    # Saves: step 2, 4, 5 (epoch end), 6, 8 ← killed half-way through writing this one.
    _run_killed(cfg_b, tmp_path, kill_in_save=5)
    ckpt_dir = tmp_path / "runs" / "killed" / "checkpoints"
    latest = _load(ckpt_dir / "epoch_latest.pt")
    assert (latest["step"], latest["epoch"], latest["epoch_step"]) == (6, 1, 1)
    assert list(ckpt_dir.glob(".epoch_latest.pt.*.tmp")), "the kill did not hit the checkpoint write"
    before = _step_rows(read_history(tmp_path / "runs" / "killed"))
    assert [r["step"] for r in before] == list(range(1, 9))  # steps 7-8 were lost with the kill

    resumed = train(cfg_b)
    assert (resumed.steps, resumed.epochs) == (2 * STEPS_PER_EPOCH, 2)
    assert not list(ckpt_dir.glob(".*.tmp")), "the half-written checkpoint was left behind"
    _assert_same_run(unbroken, resumed)
    # Nothing left to do: a third call changes nothing.
    again = train(cfg_b)
    assert again.steps == resumed.steps
    _assert_same_run(unbroken, again)


def test_rerun_after_sigkill_before_the_first_checkpoint_starts_clean(data, tmp_path):
    """No checkpoint yet (the default saves only at epoch ends): the rerun starts over, logging each step once."""
    cfg = _config(data, tmp_path / "runs", "early", max_epochs=1, val_data=None)
    _run_killed(cfg, tmp_path, kill_at_loss_call=4)
    run_dir = tmp_path / "runs" / "early"
    assert not (run_dir / "checkpoints" / "epoch_latest.pt").exists()
    # Killed in step 4's forward: step 3's row is still in flight (rows are read one step late).
    assert [r["step"] for r in read_history(run_dir)] == [1, 2]
    result = train(cfg)
    assert [r["step"] for r in read_history(run_dir)] == list(range(1, STEPS_PER_EPOCH + 1))
    assert result.history == read_history(run_dir)


def test_resume_after_sigkill_with_feature_kd_and_cache_is_exact(data, tmp_path, random_teacher):
    """Distillation (feature KD: its projector is trained and checkpointed) from the teacher cache."""
    cfg = _config(data, tmp_path / "runs", "unbroken", distillation=True, teacher_model_name=random_teacher,
                  kd_loss="feature", kd_loss_weight=1.0, save_step_frequency=2)
    unbroken = train(cfg)
    cfg_b = dict(cfg, name="killed")
    _run_killed(cfg_b, tmp_path, kill_at_loss_call=8)  # mid-step 8 of 10, after the step-6 checkpoint
    run_b = tmp_path / "runs" / "killed"
    latest = _load(run_b / "checkpoints" / "epoch_latest.pt")
    assert (latest["step"], latest["epoch"], latest["epoch_step"]) == (6, 1, 1)
    assert set(latest["kd_state"]) == {"proj.weight"}
    # Step 7's row was still in flight (rows are read one step late) when step 8 was killed.
    assert [r["step"] for r in _step_rows(read_history(run_b))] == list(range(1, 7))

    resumed = train(cfg_b)
    _assert_same_run(unbroken, resumed)
    proj0 = _load(run_b / "checkpoints" / "epoch1.pt")["kd_state"]["proj.weight"]
    assert not torch.equal(proj0, _load(resumed.checkpoint)["kd_state"]["proj.weight"]), "projector not trained"
    rows = _step_rows(resumed.history)
    assert all(r["loss/total"] == pytest.approx(r["loss/contrastive"] + r["loss/kd_feature"], rel=1e-6)
               for r in rows)


# --------------------------------------------------------------------------- DDP on CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(cfg: dict) -> list[str]:
    """``cnclip-kd train`` flags for a config dict (values equal to TrainConfig's defaults are left out)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    args = []
    for k, v in cfg.items():
        if v == defaults[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):  # store_true for default-False fields, --no-X for default-True ones
            args.append(flag if v else f"--no-{k.replace('_', '-')}")
        else:
            args += [flag, str(v)]
    return args


def _torchrun_train(cfg: dict, cwd: Path) -> tuple[Path, list[dict]]:
    """``cnclip-kd train`` under ``torchrun --nproc_per_node 2`` in ``cwd``; the run folder and each rank's summary.

    ``cfg["logs"]`` must be ``out/runs``: torchrun's own argument parser rejects a ``--logs`` anywhere on its
    command line as an ambiguous abbreviation of its ``--logs-specs``, so logs stays at its default (under cwd).
    """
    env = {**_child_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cnclip_kd.cli", "train", *_cli_args(cfg)]
    assert "--logs" not in cmd
    cwd.mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries, rest, decoder = [], proc.stdout.strip(), json.JSONDecoder()
    while rest:  # one JSON summary per rank (only rank 0's has the validation row)
        obj, end = decoder.raw_decode(rest)
        summaries.append(obj)
        rest = rest[end:].strip()
    return cwd / "out" / "runs" / cfg["name"], summaries


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(data, tmp_path, random_teacher):
    """torchrun --nproc_per_node 2 with batch 4 each = one process with batch 8: same losses, same weights."""
    # eps=1 and no weight decay make Adam's update nearly linear in the gradient (with the default
    # eps the first step is ~lr·sign(g), blind to a wrongly scaled gradient); lr is large enough
    # for the weights to move well past the tolerance.
    common = {"distillation": True, "teacher_model_name": random_teacher, "kd_loss": "feature", "max_steps": 2,
              "lr": 1e-2, "eps": 1.0, "wd": 0.0, "warmup": 1, "save_epoch_frequency": 0}
    single = train(_config(data, tmp_path / "single", "run", batch_size=2 * 4, **common))

    cfg = _config(data, Path("out/runs"), "run", batch_size=4, **common)
    run_dir, summaries = _torchrun_train(cfg, tmp_path / "ddp")
    assert summaries and all(s["steps"] == 2 for s in summaries)
    assert any(s["validation"] and 0 <= s["validation"]["val/p@10"] <= 1 for s in summaries)

    ddp_rows = _step_rows(read_history(run_dir))
    ref_rows = _step_rows(single.history)
    assert [r["step"] for r in ddp_rows] == [1, 2], "each step must be logged once (by rank 0)"
    for a, b in zip(ref_rows, ddp_rows):
        assert set(a) == set(b) and {"loss/contrastive", "loss/kd_feature", "loss/total"} <= set(a)
        assert b["lr"] == a["lr"]
        for k in ("loss/total", "loss/contrastive", "loss/kd_feature"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), (b["step"], k)
    assert len(_val_rows(read_history(run_dir))) == 1

    ca, cb = _load(single.checkpoint), _load(run_dir / "checkpoints" / "epoch_latest.pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # the seed in _config: the student's initial weights
        init = build_model(PRESETS["tiny"]).state_dict()
    moved = max(float((ca["state_dict"][f"module.{k}"] - v).abs().max()) for k, v in init.items())
    # With eps=1 each Adam step moves a weight by less than lr: 2 steps, lr 1e-2.
    assert 1e-3 < moved <= 2 * 1e-2 + 1e-6
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, rtol=0, atol=1e-5, msg=k)
    torch.testing.assert_close(cb["kd_state"]["proj.weight"], ca["kd_state"]["proj.weight"], rtol=0, atol=1e-5)

    # The teacher cache the two ranks built shard by shard equals the one-process cache.
    (one,), (two,) = [list(d.iterdir()) for d in (tmp_path / "single" / "teacher-cache",
                                                  run_dir.parent / "teacher-cache")]
    assert one.name == two.name and (two / "meta.json").is_file()
    c1, c2 = TeacherFeatureCache(one), TeacherFeatureCache(two)
    ids = torch.tensor(sorted(c1.row))
    assert sorted(c2.row) == ids.tolist() and len(ids) == N_TRAIN
    torch.testing.assert_close(c2.lookup(ids), c1.lookup(ids), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_title_positives_and_unlabelled_photos_match_one_process(data, tmp_path, random_teacher, monkeypatch):
    """Title keys and the unlabelled KD photos are split over the ranks and gathered back: 2 × batch 8 with 4 extra
    photos each = one process with batch 16 and 8 extra photos, step for step."""
    common = {"distillation": True, "teacher_model_name": random_teacher, "kd_loss": "relation", "max_steps": 2,
              "lr": 1e-2, "eps": 1.0, "wd": 0.0, "warmup": 1, "save_epoch_frequency": 0, "val_data": None,
              "title_positives": True, "kd_images": str(data / "lmdb" / "valid"), "kd_images_ratio": 0.5}
    keys_seen, forward = [], DistillationLoss.forward

    def spy(self, *args, **kwargs):
        keys_seen.append(kwargs.get("title_keys"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DistillationLoss, "forward", spy)
    single = train(_config(data, tmp_path / "single", "run", batch_size=2 * 8, **common))
    # The batch's title keys reach the loss: seed 7's second batch of 16 repeats one title.
    assert [len(set(k.tolist())) for k in keys_seen] == [16, 15]
    run_dir, summaries = _torchrun_train(_config(data, Path("out/runs"), "run", batch_size=8, **common),
                                         tmp_path / "ddp")
    assert summaries and all(s["steps"] == 2 for s in summaries)
    ref_rows, ddp_rows = _step_rows(single.history), _step_rows(read_history(run_dir))
    assert [r["step"] for r in ddp_rows] == [1, 2]
    for a, b in zip(ref_rows, ddp_rows, strict=True):
        for k in ("loss/total", "loss/contrastive", "loss/kd_relation"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), (b["step"], k)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["kd_images_n"] == json.loads((single.run_dir / "metrics.json").read_text())["kd_images_n"] > 0
    ca, cb = _load(single.checkpoint), _load(run_dir / "checkpoints" / "epoch_latest.pt")
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, rtol=0, atol=1e-5, msg=k)


# --------------------------------------------------------------------------- teacher cache, frozen teacher


class _TeacherSpy:
    """Counts Teacher.encode_image calls inside / outside the cache build; keeps the loaded teachers."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.calls = {"cache": 0, "train": 0}
        self.in_cache = False
        self.teachers: list[tuple[Teacher, dict]] = []
        encode, build, load = Teacher.encode_image, train_mod.build_teacher_cache, teachers_mod.load_teacher
        spy = self

        def counting_encode(self, images):
            spy.calls["cache" if spy.in_cache else "train"] += 1
            return encode(self, images)

        def flagged_build(*a, **k):
            spy.in_cache = True
            try:
                return build(*a, **k)
            finally:
                spy.in_cache = False

        def recording_load(*a, **kw):
            teacher = load(*a, **kw)
            spy.teachers.append((teacher, {k: v.clone() for k, v in teacher.state_dict().items()}))
            return teacher

        mp.setattr(Teacher, "encode_image", counting_encode)
        mp.setattr(train_mod, "build_teacher_cache", flagged_build)
        mp.setattr(teachers_mod, "load_teacher", recording_load)

    def reset(self) -> None:
        self.calls = {"cache": 0, "train": 0}


@pytest.fixture(scope="module")
def kd_runs(data, teacher_dir, tmp_path_factory):
    """Feature KD from the ModelScope teacher folder, 2 epochs: with the cache, and with the teacher online."""
    root = tmp_path_factory.mktemp("kd")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        spy = _TeacherSpy(mp)
        for name, extra in (("cached", {}), ("online", {"teacher_cache": False})):
            logs = root / name / "runs"
            spy.reset()
            result = train(_config(data, logs, name, distillation=True, teacher_model_name=str(teacher_dir),
                                   kd_loss="feature", **extra))
            out[name] = {"result": result, "logs": logs, "calls": dict(spy.calls), "teacher": spy.teachers[-1]}
    return out


def test_teacher_cache_built_once_then_reused(kd_runs, data, teacher_dir, monkeypatch):
    run = kd_runs["cached"]
    # The teacher ran only while the cache was built (40 images / batch 16), never in the 10 training steps.
    assert run["calls"] == {"cache": math.ceil(N_TRAIN / 16), "train": 0}
    assert run["result"].steps == 2 * STEPS_PER_EPOCH
    (cache_dir,) = list((run["logs"] / "teacher-cache").iterdir())
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert (meta["n_images"], meta["embed_dim"], meta["kind"]) == (N_TRAIN, 32, "clip")

    # The cached features are the teacher's own, on its own transform of each image.
    teacher = load_teacher(str(teacher_dir))
    ds = LMDBImages(data / "lmdb" / "train", teacher.transform)
    ids = torch.tensor(ds.image_ids)
    images = torch.stack([ds[i][1] for i in range(len(ds))])
    direct = teacher.encode_image(images)
    torch.testing.assert_close(TeacherFeatureCache(cache_dir).lookup(ids), direct, rtol=1e-5, atol=1e-6)

    # A second run (new name, same logs folder) does not run the teacher at all.
    spy = _TeacherSpy(monkeypatch)
    again = train(_config(data, run["logs"], "cached-again", distillation=True, teacher_model_name=str(teacher_dir),
                          kd_loss="feature", max_epochs=1, val_data=None))
    assert spy.calls == {"cache": 0, "train": 0}
    assert again.steps == STEPS_PER_EPOCH
    assert [p.name for p in (run["logs"] / "teacher-cache").iterdir()] == [cache_dir.name]


def test_online_teacher_gives_the_same_training_as_the_cache(kd_runs):
    online = kd_runs["online"]
    assert online["calls"] == {"cache": 0, "train": 2 * STEPS_PER_EPOCH}  # once per step
    assert not (online["logs"] / "teacher-cache").exists()
    cached_rows = _step_rows(kd_runs["cached"]["result"].history)
    online_rows = _step_rows(online["result"].history)
    assert len(cached_rows) == len(online_rows) == 2 * STEPS_PER_EPOCH
    for a, b in zip(cached_rows, online_rows):
        for k in ("loss/total", "loss/contrastive", "loss/kd_feature"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    assert all(r["loss/kd_feature"] > 0 for r in online_rows)
    metrics = json.loads((online["result"].run_dir / "metrics.json").read_text())
    assert (metrics["kd_loss"], metrics["teacher"]) == ("feature", str(online["teacher"][0].name))


@pytest.mark.parametrize("run", ["online", "cached"])
def test_teacher_stays_frozen(kd_runs, run):
    teacher, before = kd_runs[run]["teacher"]
    assert isinstance(teacher, Teacher)
    assert not teacher.training and not [m for m in teacher.modules() if m.training]
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_augmentation_runs_the_teacher_online_without_a_cache(data, teacher_dir, tmp_path, monkeypatch):
    spy = _TeacherSpy(monkeypatch)
    result = train(_config(data, tmp_path / "runs", "augment", distillation=True,
                           teacher_model_name=str(teacher_dir), use_augment=True, max_steps=3, val_data=None,
                           kd_loss="cosine"))
    assert result.steps == 3
    assert spy.calls == {"cache": 0, "train": 3}
    assert not (tmp_path / "runs" / "teacher-cache").exists()
    assert all(r["loss/kd_cosine"] > 0 for r in _step_rows(result.history))


def test_augmented_views_cached_once_and_equal_to_an_online_teacher(data, teacher_dir, tmp_path, monkeypatch):
    """Seeded views: the cache holds the teacher's features of the very pictures the student is shown."""
    from cnclip_kd.distill.teacher_cache import ViewAugment, epoch_views

    views = 2
    spy = _TeacherSpy(monkeypatch)
    common = dict(distillation=True, teacher_model_name=str(teacher_dir), kd_loss="relation", augment_views=views,
                  val_data=None, max_epochs=2)
    cached = train(_config(data, tmp_path / "runs", "views", **common))
    # The teacher ran only to build the cache: 40 images × 3 views in batches of 16.
    assert spy.calls == {"cache": math.ceil(N_TRAIN * (views + 1) / 16), "train": 0}
    (cache_dir,) = list((tmp_path / "runs" / "teacher-cache").iterdir())
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["views"] == views and meta["augment"] == ViewAugment().describe()
    cache = TeacherFeatureCache(cache_dir)
    assert cache.features.shape == (N_TRAIN, views + 1, 32) and cache.views == views

    # Each cached view is the teacher's feature of that seeded augmentation, and views differ from each other.
    teacher = load_teacher(str(teacher_dir))
    plain = LMDBImages(data / "lmdb" / "train", teacher.transform)
    image_id = plain.image_ids[3]
    img = plain.images.image(image_id)
    augment = ViewAugment()
    for v in range(views + 1):
        direct = teacher.encode_image(teacher.transform(augment(img, image_id, v))[None])
        torch.testing.assert_close(cache.lookup(torch.tensor([image_id]), torch.tensor([v])), direct,
                                   rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cache.lookup(torch.tensor([image_id]), torch.tensor([1])),
                              cache.lookup(torch.tensor([image_id]), torch.tensor([2])))
    assert np.asarray(augment(img, image_id, 1)).tobytes() == np.asarray(augment(img, image_id, 1)).tobytes()
    # Every epoch shows a seeded mix of the views, another one the next epoch.
    shown = [epoch_views(N_TRAIN, views, 7, e) for e in range(2)]
    assert shown[0] == epoch_views(N_TRAIN, views, 7, 0) and shown[0] != shown[1]
    assert set(shown[0]) == {0, 1, 2}

    # The online teacher on the same views gives the same losses step for step.
    spy.reset()
    online = train(_config(data, tmp_path / "online", "views", teacher_cache=False, **common))
    assert spy.calls == {"cache": 0, "train": 2 * STEPS_PER_EPOCH}
    for a, b in zip(_step_rows(cached.history), _step_rows(online.history), strict=True):
        assert b["loss/kd_relation"] == pytest.approx(a["loss/kd_relation"], rel=1e-4, abs=1e-6), a["step"]

    # Another seed and another loss reuse the cache: the teacher does not run again.
    spy.reset()
    train(_config(data, tmp_path / "runs", "views-seed8", **{**common, "kd_loss": "feature", "max_epochs": 1},
                  seed=8))
    assert spy.calls == {"cache": 0, "train": 0}
    with pytest.raises(ValueError, match="augment_views"):
        train(_config(data, tmp_path / "runs", "bad", augment_views=-1, max_steps=1))


def test_mixed_views_blend_two_photos_and_the_cache_holds_the_teacher_of_that_blend(data, teacher_dir, tmp_path):
    """augment_mix: a mixed view is λ × the image's view + (1 − λ) × another photo's view, seeded; the teacher's
    cached feature is of that very blend, and the student's sample is the same picture."""
    from PIL import Image

    from cnclip_kd.distill.pairs import LMDBPairs
    from cnclip_kd.distill.teacher_cache import ViewAugment

    views = 2
    common = dict(distillation=True, teacher_model_name=str(teacher_dir), kd_loss="relation", augment_views=views,
                  val_data=None, max_epochs=1, teacher_precision="fp32")
    train(_config(data, tmp_path / "runs", "mixed", augment_mix=1.0, **common))
    (cache_dir,) = list((tmp_path / "runs" / "teacher-cache").iterdir())
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["augment"] == ViewAugment(mix=1.0).describe() and meta["augment"]["mix"] == 1.0
    # Without mixing the key (and so an existing cache) is the one of earlier versions.
    assert "mix" not in ViewAugment().describe()

    cache = TeacherFeatureCache(cache_dir)
    teacher = load_teacher(str(teacher_dir))
    source = LMDBImages(data / "lmdb" / "train", teacher.transform).images
    pool = source.ids()
    mixer, plain = ViewAugment(mix=1.0), ViewAugment()
    lams = []
    for image_id in pool[:4]:
        img = source.image(image_id)
        assert mixer(img, image_id, 0, source) is img  # view 0 is never mixed
        for v in range(1, views + 1):
            partner, lam = mixer.mixing(image_id, v, pool)
            assert partner in pool and partner != image_id and 0.5 <= lam <= 1.0
            other = plain(source.image(partner), partner, v).resize(img.size, Image.BICUBIC)
            expected = np.asarray(other, np.float32) * (1 - lam) + np.asarray(plain(img, image_id, v), np.float32) * lam
            picture = mixer(img, image_id, v, source)
            assert np.abs(np.asarray(picture, np.float32) - expected).max() <= 1.0  # blend rounds to uint8
            direct = teacher.encode_image(teacher.transform(picture)[None])
            torch.testing.assert_close(cache.lookup(torch.tensor([image_id]), torch.tensor([v])), direct,
                                       rtol=1e-5, atol=1e-6)
            lams.append(lam)
    assert len(set(lams)) == len(lams)  # λ is drawn per (image, view)
    # The student's training sample in that view is the same blended picture.
    pairs = LMDBPairs(data / "lmdb" / "train", transform=teacher.transform, views=mixer)
    item = pairs[(0, 1)]
    expected = teacher.transform(mixer(source.image(item["image_id"]), item["image_id"], 1, source))
    assert torch.equal(item["image"], expected)
    # Half the views mixed: about half are, and the rest equal the unmixed view.
    half = ViewAugment(mix=0.5)
    drawn = [half.mixing(i, v, pool) for i in pool for v in (1, 2, 3, 4)]
    assert 0.3 < sum(m is not None for m in drawn) / len(drawn) < 0.7
    image_id, v = next((i, v) for i in pool for v in (1, 2, 3, 4) if half.mixing(i, v, pool) is None)
    img = source.image(image_id)
    assert np.array_equal(np.asarray(half(img, image_id, v, source)), np.asarray(plain(img, image_id, v)))

    with pytest.raises(ValueError, match="needs augment_views"):
        train(_config(data, tmp_path / "runs", "bad", augment_mix=0.5, max_steps=1))
    with pytest.raises(ValueError, match="mix must be in"):
        ViewAugment(mix=1.5)
    with pytest.raises(ValueError, match="source="):
        mixer(img, image_id, 1)


def test_teacher_precision_keys_the_cache_and_runs_the_teacher_in_that_dtype(data, teacher_dir, tmp_path):
    """A bf16 teacher cache is another cache (not a reuse of the fp32 one) and holds the bf16 teacher's features."""
    from cnclip_kd.core.precision import native_bf16, resolve_teacher_precision

    cpu = torch.device("cpu")
    assert resolve_teacher_precision("auto", cpu) == (torch.bfloat16 if native_bf16() else None)
    assert resolve_teacher_precision("fp32", cpu) is None
    assert resolve_teacher_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="teacher precision 'half'"):
        resolve_teacher_precision("half", cpu)

    common = dict(distillation=True, teacher_model_name=str(teacher_dir), kd_loss="relation", val_data=None,
                  max_steps=1)
    metas = {}
    for precision in ("fp32", "bf16"):
        train(_config(data, tmp_path / "runs", f"p-{precision}", teacher_precision=precision, **common))
        new = {p.name: p for p in (tmp_path / "runs" / "teacher-cache").iterdir()}.keys() - metas.keys()
        (key,) = new
        metas[key] = json.loads((tmp_path / "runs" / "teacher-cache" / key / "meta.json").read_text())
    assert sorted(m["precision"] for m in metas.values()) == ["bfloat16", "fp32"]
    bf16_dir = next(tmp_path / "runs" / "teacher-cache" / k for k, m in metas.items() if m["precision"] == "bfloat16")

    teacher = load_teacher(str(teacher_dir))
    ds = LMDBImages(data / "lmdb" / "train", teacher.transform)
    images = torch.stack([ds[i][1] for i in range(len(ds))])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct = teacher.encode_image(images).float()
    cached = TeacherFeatureCache(bf16_dir).lookup(torch.tensor(ds.image_ids))
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        fp32 = teacher.encode_image(images)
    assert not torch.allclose(cached, fp32, rtol=1e-5, atol=1e-6)  # bf16 really ran
    assert torch.nn.functional.cosine_similarity(cached, fp32).min() > 0.98
    with pytest.raises(ValueError, match="teacher precision"):
        train(_config(data, tmp_path / "runs", "p-bad", teacher_precision="half", **common))


# --------------------------------------------------------------------------- NaN stop


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    saved: list[tuple[bytes, int]] = []
    real_save = train_mod.atomic_torch_save

    def recording_save(obj, path):
        real_save(obj, path)
        saved.append((Path(path).read_bytes(), Path(path).stat().st_mtime_ns))

    monkeypatch.setattr(train_mod, "atomic_torch_save", recording_save)
    cfg = _config(data, tmp_path / "runs", "explode", lr=1e6, warmup=1, save_step_frequency=1, val_data=None)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    latest = tmp_path / "runs" / "explode" / "checkpoints" / "epoch_latest.pt"
    good = _step_rows(read_history(latest.parent.parent))
    assert good and len(saved) == len(good)  # one checkpoint per good step, none after
    msg = str(info.value)
    assert f"at step {len(good) + 1} " in msg and "nan" in msg.lower()
    assert f"Last good checkpoint: {latest}." in msg
    assert latest.read_bytes() == saved[-1][0] and latest.stat().st_mtime_ns == saved[-1][1]
    ckpt = _load(latest)
    assert ckpt["step"] == len(good)
    model, _ = load_student(latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (latest.parent.parent / "metrics.json").exists()


class _NaNAtCall(train_mod.DistillationLoss):
    calls = 0
    nan_at = 1

    def forward(self, *a, **k):
        out = super().forward(*a, **k)
        type(self).calls += 1
        if type(self).calls == self.nan_at:
            out["total"] = out["total"] * float("nan")
        return out


def test_nan_before_any_checkpoint_through_the_cli(data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_mod, "DistillationLoss", type("NaNFirst", (_NaNAtCall,), {"calls": 0}))
    cfg = _config(data, tmp_path / "runs", "nan-first", val_data=None)
    with caplog.at_level("INFO"):
        rc = cli_main(["train", *_cli_args(cfg)])
    assert rc == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "at step 1 " in errors[0].getMessage() and "none written yet" in errors[0].getMessage()
    assert not (tmp_path / "runs" / "nan-first" / "checkpoints" / "epoch_latest.pt").exists()


# --------------------------------------------------------------------------- errors and the CLI


def test_unknown_teacher_lists_valid_forms(data, tmp_path):
    with pytest.raises(TeacherLoadError) as info:
        train(_config(data, tmp_path, "bad", distillation=True, teacher_model_name="damo/no-such-teacher"))
    msg = str(info.value)
    assert "unknown teacher 'damo/no-such-teacher'" in msg
    for form in ("cnclip:<ARCH>", "random:<ARCH>", "local ModelScope model directory", "*.pt", *TEACHERS):
        assert form in msg, form


def test_distillation_without_teacher_name_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="teacher_model_name"):
        train(_config(data, tmp_path, "no-teacher", distillation=True))


def test_unreachable_hub_through_train_names_the_local_folder_fix(data, tmp_path, unreachable_hub):
    with pytest.raises(TeacherLoadError) as info:
        train(_config(data, tmp_path / "runs", "hub", distillation=True, teacher_model_name=HUB_ID,
                      download_root=str(tmp_path / "ms-cache")))
    msg = str(info.value)
    assert "could not be reached" in msg and "local directory" in msg
    assert "--teacher-model-name /path/to/dir" in msg and f"modelscope download {HUB_ID}" in msg


def test_cli_unreachable_hub_exits_2_with_one_error(data, tmp_path, unreachable_hub, caplog, capsys):
    cfg = _config(data, tmp_path / "runs", "hub", distillation=True, teacher_model_name=HUB_ID,
                  download_root=str(tmp_path / "ms-cache"))
    rc = cli_main(["train", *_cli_args(cfg)])
    assert rc == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "local directory" in errors[0].getMessage()
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err


def test_cli_unknown_teacher_exits_2_without_traceback(data, tmp_path):
    cfg = _config(data, tmp_path / "runs", "bad", distillation=True, teacher_model_name="no/such-teacher")
    proc = subprocess.run([sys.executable, "-m", "cnclip_kd.cli", "train", *_cli_args(cfg)], capture_output=True,
                          text=True, timeout=300, env=_child_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    error_lines = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(error_lines) == 1 and "unknown teacher 'no/such-teacher'" in error_lines[0]
    assert "Valid teacher names" in proc.stderr


def test_parser_accepts_cnclip_spellings():
    parser = build_parser()
    args = parser.parse_args(["train", "--train-data", "d/lmdb/train", "--distllation", "--kd_loss_weight", "0.25",
                              "--teacher-model-name", "t", "--no-teacher-cache", "--max-steps", "3"])
    assert (args.distillation, args.kd_loss_weight, args.teacher_model_name) == (True, 0.25, "t")
    assert (args.teacher_cache, args.max_steps, args.train_data) == (False, 3, "d/lmdb/train")
    args = parser.parse_args(["train", "--train-data", "x", "--distillation", "--kd-loss-weight", "2"])
    assert (args.distillation, args.kd_loss_weight, args.teacher_cache) == (True, 2.0, True)
    args = parser.parse_args(["train", "--train-data", "x"])
    assert (args.distillation, args.kd_loss_weight, args.val_data, args.use_augment) == (False, 0.5, None, False)
    assert args.image_resolution is None
    assert parser.parse_args(["train", "--train-data", "x", "--image-resolution", "128"]).image_resolution == 128
    assert parser.parse_args(["train", "--train-data", "x", "--augment-mix", "0.5"]).augment_mix == 0.5
    assert args.augment_mix == 0.0


def test_preset_overrides_zero_keeps_the_preset_except_where_zero_is_a_value(tmp_path):
    from cnclip_kd.notebook.experiments import PRESET_DEFAULTS, preset_config, preset_values

    demo = PRESET_DEFAULTS["demo"]
    # The notebooks pass 0 / "" for "the preset's value" ...
    kept = preset_values("demo", max_epochs=0, kd_loss_weight=0.0, kd_loss="", lr=None)
    assert (kept["max_epochs"], kept["kd_loss_weight"], kept["kd_loss"], kept["lr"]) == (
        demo["max_epochs"], demo["kd_loss_weight"], demo["kd_loss"], demo["lr"])
    # ... but no augmented views and seed 0 are real choices (AUGMENT_VIEWS=0 used to train with the preset's 4).
    cfg = preset_config("demo", tmp_path / "data", tmp_path / "out", augment_views=0, seed=0, max_epochs=3)
    assert (cfg.augment_views, cfg.seed, cfg.max_epochs) == (0, 0, 3) and demo["augment_views"] == 4
    # The demo's student: the ImageNet-pretrained Lite0 tower at 64 px, 15 epochs, cn_clip's KD weight (measured).
    assert (demo["preset"], demo["image_resolution"], demo["max_epochs"], demo["kd_loss_weight"], demo["lr"]) == (
        "demo-lite0", 64, 15, 0.5, 2e-3)
    # The same student at its own 128 px differs only in that (its measured figures are for that recipe) ...
    pretrained = preset_values("demo-pretrained")
    assert {k for k in pretrained if pretrained[k] != demo.get(k)} == {"image_resolution"}
    assert pretrained["image_resolution"] == 128 == PRESETS["demo-lite0"]["image_resolution"]
    # ... the demo up to 0.3.3 in student (at its own side), KD weight and epochs; the longer one on top of it in
    # views and epochs. Same teacher, loss, lr and views as the demo.
    scratch, long = preset_values("demo-scratch"), preset_values("demo-long")
    assert {k for k in set(scratch) | set(demo) if scratch.get(k) != demo.get(k)} == {
        "preset", "image_resolution", "kd_loss_weight", "max_epochs"}
    assert (scratch["preset"], "image_resolution" in scratch, scratch["kd_loss_weight"], scratch["max_epochs"]) == (
        "demo-resnet", False, 5.0, 80)
    assert {k for k in long if long[k] != scratch.get(k)} == {"augment_views", "max_epochs"}
    assert (long["augment_views"], long["max_epochs"]) == (16, 200)
    # A run at the preset's own side keeps its name; another side gets its own run folder.
    assert preset_config("demo", tmp_path, tmp_path, name="demo").name == "demo"
    assert preset_config("demo-pretrained", tmp_path, tmp_path, name="p").name == "p"
    assert preset_config("demo", tmp_path, tmp_path, name="demo", image_resolution=96).name == "demo-96px"
    with pytest.raises(ValueError, match="unknown PRESET 'nope'"):
        preset_values("nope")


def test_compare_kd_refuses_an_unknown_loss_before_training(tmp_path):
    from cnclip_kd.notebook.experiments import compare_kd, preset_config

    base = preset_config("tiny", tmp_path / "missing-data", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown KD loss 'relaton'; valid names: cosine, feature, relation"):
        compare_kd(base, eval_data=tmp_path / "missing-data" / "lmdb" / "test", kd_losses=["relation", "relaton"],
                   include_teacher=False)
    assert not (tmp_path / "out").exists()  # nothing trained


def test_a_student_embedding_of_exactly_zero_trains_without_nan():
    # An EfficientNet tower's last ReLU6 map can be all zero for one image at 64 px (notebook 02's seed 123 hit
    # it at step 7). cn_clip's own forward divides by the norm, 0/0, and that one NaN row reaches every weight
    # through the batch's losses; the trainer's forward keeps the row zero and the gradients finite.
    from cn_clip.clip import tokenize

    from cnclip_kd.distill.losses import DistillationLoss, RelationKDLoss
    from cnclip_kd.distill.trainer import _StudentWithKD

    class FirstRowZero(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        @property
        def conv1(self):  # cn_clip's CLIP.dtype reads it
            return self.inner.conv1

        def forward(self, x, mask_ratio=0):
            out = self.inner(x)
            return torch.cat([out[:1] * 0, out[1:]])

    torch.manual_seed(0)
    model, info = load_student(None, preset="tiny")
    model.visual = FirstRowZero(model.visual)
    images = torch.randn(4, 3, info["image_resolution"], info["image_resolution"])
    texts = tokenize(["红色连衣裙", "运动鞋", "帆布包", "牛仔裤"], context_length=24)
    ref = model(images, texts)[0]
    assert torch.isnan(ref[0]).all()  # cn_clip's forward: the zero row is NaN
    student = _StudentWithKD(model, None)
    img, txt, scale = student(images, texts)
    assert torch.isfinite(img).all() and img[0].abs().sum() == 0
    assert torch.allclose(img[1:].norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(4))
    assert torch.allclose(img[1:], ref[1:], atol=1e-6)  # the other rows are cn_clip's own, unchanged
    loss = DistillationLoss(RelationKDLoss(), kd_loss_weight=0.5)(img, txt, scale, torch.randn(4, 16))["total"]
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
