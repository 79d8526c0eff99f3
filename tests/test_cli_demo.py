"""The offline demo through the CLI: prepare → train a teacher → export it → distil through ModelScope's loader."""

import json
import subprocess
import sys

import pytest
import torch

from cnclip_kd import SAMPLE_DATA

pytestmark = pytest.mark.slow


def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "cnclip_kd.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cli_demo_pipeline(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    _cli("prepare", str(SAMPLE_DATA), str(data), "--valid-frac", "0.2", "--test-frac", "0.2")
    common = ["--train-data", str(data / "lmdb" / "train"), "--val-data", str(data / "lmdb" / "valid"),
              "--logs", str(runs), "--batch-size", "32", "--num-workers", "0", "--warmup", "2", "--lr", "1e-3"]
    teacher_run = json.loads(_cli("train", *common, "--preset", "tiny", "--name", "teacher", "--max-steps", "4"))
    assert teacher_run["steps"] == 4 and 0 <= teacher_run["validation"]["val/p@10"] <= 1

    teacher_dir = tmp_path / "teachers" / "tiny"
    out = _cli("export-teacher", teacher_run["checkpoint"], str(teacher_dir))
    assert out.strip() == str(teacher_dir.resolve())
    assert json.loads((teacher_dir / "configuration.json").read_text())["model"]["type"]

    student = json.loads(_cli("train", *common, "--preset", "tiny", "--name", "student", "--max-steps", "3",
                              "--distllation", "--teacher-model-name", str(teacher_dir),
                              "--kd-loss", "relation", "--kd_loss_weight", "1.0"))
    ckpt = torch.load(student["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["teacher"] == str(teacher_dir) and ckpt["kd_loss"] == "relation" and ckpt["step"] == 3
    rows = [json.loads(line) for line in (runs / "student" / "history.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert len(steps) == 3
    assert all(r["loss/total"] == pytest.approx(r["loss/contrastive"] + 1.0 * r["loss/kd_relation"], rel=1e-5)
               for r in steps)
    # The teacher's features were cached once, beside the runs.
    assert len(list((runs / "teacher-cache").glob("*/meta.json"))) == 1
