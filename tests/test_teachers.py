"""Teachers load through the real ModelScope / cn_clip code and behave as frozen encoders."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnclip_kd.models.teachers import TEACHERS, Teacher, TeacherLoadError, export_cnclip_teacher, load_teacher
from teacher_fixtures import (TINY_RLEG, TINY_TEXT, TINY_VISION,  # noqa: F401 - fixtures
                              make_tiny_clip_teacher_dir, make_tiny_cnclip_model, team_dir,
                              tiny_clip_dir, tiny_cnclip_config_files, tiny_rleg_dir)

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _photo(size=(50, 40), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _assert_frozen(teacher: Teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in teacher.parameters()) > 0
    assert teacher.train() is teacher
    teacher.train(True)
    assert not teacher.training
    assert [m for m in teacher.modules() if m.training] == []


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- table


def test_known_teachers_table():
    assert TEACHERS == {
        "damo/multi-modal_clip-vit-huge-patch14_zh": "clip",
        "damo/multi-modal_clip-vit-large-patch14_zh": "clip",
        "damo/multi-modal_team-vit-large-patch14_multi-modal-similarity": "team",
        "damo/multi-modal_rleg-vit-large-patch14": "rleg",
    }


# --------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_teacher(tiny_clip_dir) -> Teacher:
    return load_teacher(str(tiny_clip_dir))


def test_clip_dir_loads_through_modelscope(clip_teacher, tiny_clip_dir):
    assert type(clip_teacher.model).__name__ == "CLIPForMultiModalEmbedding"
    assert type(clip_teacher.model).__module__.startswith("modelscope.")
    assert (clip_teacher.kind, clip_teacher.embed_dim, clip_teacher.resolution) == ("clip", 32, 32)
    assert clip_teacher.name == str(tiny_clip_dir)


def test_clip_features_are_the_models_own_unnormalised(clip_teacher, tiny_clip_dir):
    x = _images(3, 32)
    feats = clip_teacher.encode_image(x)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    assert not feats.requires_grad
    norms = feats.norm(dim=-1)
    assert not torch.allclose(norms, torch.ones(3), atol=1e-2)
    with torch.no_grad():
        direct = clip_teacher.model.clip_model.encode_image(x)
    torch.testing.assert_close(feats, direct, rtol=0, atol=0)
    torch.testing.assert_close(clip_teacher(x), feats, rtol=0, atol=0)
    # An independent load of the same directory gives the same features: weights come
    # from pytorch_model.bin, not from the random init.
    from modelscope.models import Model

    other = Model.from_pretrained(str(tiny_clip_dir))
    other.clip_model.to("cpu").float()  # on a CUDA machine modelscope puts it there in fp16
    with torch.no_grad():
        torch.testing.assert_close(other.clip_model.encode_image(x), feats)


def test_clip_teacher_is_frozen(clip_teacher):
    _assert_frozen(clip_teacher)
    x = _images(2, 32).requires_grad_(True)
    assert not clip_teacher.encode_image(x).requires_grad


def test_clip_transform_mirrors_the_clip_preprocessor(clip_teacher):
    # modelscope's CLIPPreprocessor (inference) is Resize((R, R), bicubic) -> RGB ->
    # ToTensor -> Normalize, the same Compose as cn_clip's image_transform; its module
    # cannot be imported without decord + datasets, so cn_clip's is the reference.
    from cn_clip.clip.utils import image_transform

    ref = image_transform(32)
    for img in (_photo(), _photo((33, 71), "L"), _photo((64, 64), "RGBA")):
        out = clip_teacher.transform(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref(img), rtol=0, atol=0)
    white = clip_teacher.transform(Image.new("RGB", (10, 20), (255, 255, 255)))
    torch.testing.assert_close(white, ((1 - MEAN) / STD)[:, None, None].expand(3, 32, 32))


def test_fingerprint_tracks_weights_not_path(clip_teacher, tiny_clip_dir, tmp_path):
    fp = clip_teacher.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    copied = shutil.copytree(tiny_clip_dir, tmp_path / "copy")
    assert load_teacher(str(copied)).fingerprint() == fp
    other = make_tiny_clip_teacher_dir(tmp_path / "seed1", seed=1)
    assert load_teacher(str(other)).fingerprint() != fp


# --------------------------------------------------------------------------- RLEG


@pytest.fixture(scope="module")
def rleg_teacher(tiny_rleg_dir) -> Teacher:
    return load_teacher(str(tiny_rleg_dir))


def test_rleg_features_unit_norm_and_the_models_own(rleg_teacher, clip_teacher):
    assert type(rleg_teacher.model).__name__ == "RLEGForMultiModalEmbedding"
    assert (rleg_teacher.kind, rleg_teacher.embed_dim, rleg_teacher.resolution) == ("rleg", 24, 32)
    x = _images(4, 32, seed=1)
    feats = rleg_teacher.encode_image(x)
    assert feats.shape == (4, 24) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    with torch.no_grad():
        direct = rleg_teacher.model.model.encode_image(x)
    torch.testing.assert_close(feats, direct, rtol=0, atol=0)
    _assert_frozen(rleg_teacher)
    assert rleg_teacher.fingerprint() != clip_teacher.fingerprint()


def test_rleg_transform_mirrors_modelscope_preprocessor(rleg_teacher):
    # RLEG's own preprocessor is Resize((224, 224)) (bilinear) + CLIP mean/std; ours
    # is the same at the tower's resolution (32 for this tiny tower, 224 for the real).
    ref = copy.deepcopy(rleg_teacher.model.img_preprocessor)
    ref.transforms[0].size = (32, 32)
    for img in (_photo(seed=3), _photo((80, 30), "L", seed=4)):
        out = rleg_teacher.transform(img)
        assert out.shape == (3, 32, 32)
        torch.testing.assert_close(out, ref(img.convert("RGB")), rtol=0, atol=0)


# --------------------------------------------------------------------------- TEAM


@pytest.mark.slow
def test_team_full_size_random_weights(team_dir):
    teacher = load_teacher(str(team_dir))
    assert type(teacher.model).__name__ == "TEAMForMultiModalSimilarity"
    assert (teacher.kind, teacher.embed_dim, teacher.resolution) == ("team", 768, 224)
    img = _photo((300, 200), seed=5)
    x = teacher.transform(img).unsqueeze(0)
    torch.testing.assert_close(x[0], teacher.model.img_preprocessor(img), rtol=0, atol=0)
    feats = teacher.encode_image(x)
    assert feats.shape == (1, 768) and feats.dtype == torch.float32
    with torch.no_grad():
        direct, tokens = teacher.model.model.image_model(x)
    assert tokens.shape == (1, 257, 1024)
    torch.testing.assert_close(feats, direct, rtol=0, atol=0)
    assert abs(feats.norm().item() - 1.0) > 1e-2
    _assert_frozen(teacher)


# --------------------------------------------------------------------------- cn_clip


@pytest.fixture(scope="module")
def tiny_cnclip(tmp_path_factory):
    """A tiny cn_clip CLIP with fp16-rounded weights (as cn_clip/modelscope load them)."""
    from cn_clip.clip.model import convert_weights

    model = make_tiny_cnclip_model(seed=3)
    convert_weights(model)
    model.float()
    vision, text = tiny_cnclip_config_files(tmp_path_factory.mktemp("configs"))
    return model, vision, text


def test_export_round_trip_matches_cnclip_encode_image(tiny_cnclip, tmp_path):
    model, vision, text = tiny_cnclip
    out = export_cnclip_teacher(model, tmp_path / "exported", vision_model=vision,
                                text_model=text)
    assert out == (tmp_path / "exported").resolve()
    assert sorted(p.name for p in out.iterdir()) == [
        "configuration.json", "pytorch_model.bin", "text_model_config.json",
        "vision_model_config.json", "vocab.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temp dir left
    assert json.loads((out / "vision_model_config.json").read_text()) == TINY_VISION
    teacher = load_teacher(str(out))
    assert type(teacher.model).__name__ == "CLIPForMultiModalEmbedding"
    assert (teacher.kind, teacher.embed_dim, teacher.resolution) == ("clip", 32, 32)
    x = _images(3, 32, seed=7)
    with torch.no_grad():
        expected = model.encode_image(x)
    torch.testing.assert_close(teacher.encode_image(x), expected, rtol=1e-5, atol=1e-5)


def test_export_from_checkpoint_file_and_replace(tiny_cnclip, tmp_path):
    model, vision, text = tiny_cnclip
    ckpt = tmp_path / "epoch_latest.pt"
    # cn_clip's checkpoint layout: DDP-prefixed state_dict plus training state.
    torch.save({"epoch": 1, "step": 10, "name": "tiny",
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "configuration.json").write_text("{}")  # an older export: replaced
    # Mappings work too (as a merged cn_clip model_info split in two); keys cn_clip's CLIP
    # does not take (use_flash_attention) stay out of the written configs.
    export_cnclip_teacher(str(ckpt), out, vision_model=dict(TINY_VISION),
                          text_model=dict(TINY_TEXT, use_flash_attention=False))
    assert json.loads((out / "text_model_config.json").read_text()) == TINY_TEXT
    assert json.loads((out / "configuration.json").read_text())["model"]["type"] == \
        "clip-multi-modal-embedding"
    x = _images(2, 32, seed=8)
    with torch.no_grad():
        expected = model.encode_image(x)
    torch.testing.assert_close(load_teacher(str(out)).encode_image(x), expected,
                               rtol=1e-5, atol=1e-5)
    stranger = tmp_path / "not-a-teacher"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        export_cnclip_teacher(model, stranger, vision_model=vision, text_model=text)
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_cnclip_checkpoint_loads_as_teacher(tiny_cnclip, tmp_path):
    model, vision, text = tiny_cnclip
    x = _images(2, 32, seed=9)
    with torch.no_grad():
        expected = model.encode_image(x)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    teacher = load_teacher(str(ckpt), vision_model=str(vision), text_model=str(text))
    assert type(teacher.model).__module__ == "cn_clip.clip.model"
    assert (teacher.kind, teacher.embed_dim, teacher.resolution) == ("cnclip", 32, 32)
    torch.testing.assert_close(teacher.encode_image(x), expected, rtol=1e-5, atol=1e-5)
    _assert_frozen(teacher)
    # Same transform as cn_clip's own image_transform.
    from cn_clip.clip.utils import image_transform

    img = _photo((45, 61), "L", seed=2)
    torch.testing.assert_close(teacher.transform(img), image_transform(32)(img), rtol=0, atol=0)

    named = tmp_path / "named.pt"
    torch.save({"state_dict": model.state_dict(), "vision_model": str(vision),
                "text_model": str(text)}, named)
    torch.testing.assert_close(load_teacher(str(named)).encode_image(x), expected,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(TeacherLoadError, match="vision_model"):
        load_teacher(str(ckpt))


def test_half_precision_teacher_ignores_callers_autocast(tiny_cnclip, tmp_path):
    # As on CUDA, where cn_clip/modelscope CLIP teachers run in fp16: a caller's bf16
    # autocast must not change their features.
    model, vision, text = tiny_cnclip
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    teacher = load_teacher(str(ckpt), vision_model=vision, text_model=text)
    from cn_clip.clip.model import convert_weights

    convert_weights(teacher.model)  # the dtypes cn_clip gives it on CUDA
    assert teacher._stem_weight().dtype == torch.float16
    x = _images(2, 32, seed=11)
    plain = teacher.encode_image(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = teacher.encode_image(x)
    assert plain.dtype == under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


def test_random_teacher_is_deterministic(tiny_cnclip):
    _, vision, text = tiny_cnclip
    name = f"random:{vision}@{text}"
    a, b = load_teacher(name), load_teacher(name)
    assert (a.kind, a.embed_dim, a.resolution) == ("cnclip", 32, 32)
    x = _images(2, 32)
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x), rtol=0, atol=0)
    assert a.fingerprint() == b.fingerprint()
    _assert_frozen(a)


def test_random_teacher_by_arch_name():
    teacher = load_teacher("random:RN50")
    assert (teacher.kind, teacher.embed_dim, teacher.resolution) == ("cnclip", 1024, 224)
    assert teacher.encode_image(_images(1, 224)).shape == (1, 1024)


# --------------------------------------------------------------------------- failures


def test_unreachable_hub_fails_fast_with_local_dir_hint(unreachable_hub, tmp_path):
    hub_id = "damo/multi-modal_clip-vit-large-patch14_zh"
    start = time.monotonic()
    with pytest.raises(TeacherLoadError) as info:
        load_teacher(hub_id, download_root=str(tmp_path / "cache"))
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert "could not be reached" in msg and "local directory" in msg
    assert "--teacher-model-name /path/to/dir" in msg
    assert f"modelscope download {hub_id} --local-dir DIR" in msg
    # Bound asked for by the design (modelscope's own retries take 22-38 s here).
    assert elapsed < 15, elapsed


def test_unknown_name_lists_valid_forms():
    with pytest.raises(TeacherLoadError) as info:
        load_teacher("damo/no-such-teacher")
    msg = str(info.value)
    assert "unknown teacher 'damo/no-such-teacher'" in msg
    for part in ("cnclip:<ARCH>", "random:<ARCH>", "local ModelScope model directory",
                 "*.pt", *TEACHERS):
        assert part in msg


def test_missing_configuration_json_is_named(tiny_clip_dir, tmp_path):
    broken = _corrupt_copy(tiny_clip_dir, tmp_path / "t")
    (broken / "configuration.json").unlink()
    with pytest.raises(TeacherLoadError, match="configuration.json is missing"):
        load_teacher(str(broken))


def test_missing_class_file_is_named(tiny_clip_dir, tmp_path):
    broken = _corrupt_copy(tiny_clip_dir, tmp_path / "t")
    (broken / "vocab.txt").unlink()
    with pytest.raises(TeacherLoadError, match="lacks vocab.txt"):
        load_teacher(str(broken))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_file_is_named(tiny_clip_dir, tmp_path, damage):
    broken = _corrupt_copy(tiny_clip_dir, tmp_path / "t")
    weights = broken / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(b"not a checkpoint" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(TeacherLoadError, match="pytorch_model.bin"):
        load_teacher(str(broken))


def test_mismatched_weights_error_names_file_and_chains_cause(tiny_clip_dir, tmp_path):
    broken = _corrupt_copy(tiny_clip_dir, tmp_path / "t")
    cfg = dict(TINY_VISION, embed_dim=48)  # the saved projection is 64 x 32
    (broken / "vision_model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherLoadError) as info:
        load_teacher(str(broken))
    assert "pytorch_model.bin" in str(info.value)
    assert "CLIPForMultiModalEmbedding" in str(info.value)
    assert isinstance(info.value.__cause__, Exception)
    assert "size mismatch" in str(info.value.__cause__)


def test_unsupported_model_type_is_named(tiny_clip_dir, tmp_path):
    broken = _corrupt_copy(tiny_clip_dir, tmp_path / "t")
    (broken / "configuration.json").write_text(json.dumps(
        {"task": "text-classification", "model": {"type": "bert"}}))
    with pytest.raises(TeacherLoadError, match="not a supported teacher"):
        load_teacher(str(broken))
