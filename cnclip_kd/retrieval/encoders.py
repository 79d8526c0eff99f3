"""Encoders: a loaded model's image tower (:class:`ImageEncoder`) and text tower (:class:`TextEncoder`) behind one interface each.

* :func:`load_encoder` turns a student checkpoint, a cn_clip pretrained name or
  a teacher into one :class:`ImageEncoder` (its own preprocessing, batched,
  L2-normalised float32 features, fp16/bf16 autocast on a GPU).
* :func:`load_text_encoder` does the same for the text tower of a student or
  of a teacher that has one (cn_clip, ModelScope CLIP): cn_clip's tokenizer and
  the model's context length, L2-normalised float32 features. An image-only
  teacher raises :class:`NoTextTowerError` naming the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.tokenizer import NoTextTowerError  # noqa: F401 - defined torch-free for the serving path; public here
from ..models.students import weights_fingerprint

logger = logging.getLogger(__name__)

__all__ = ["ImageEncoder", "NoTextTowerError", "TextEncoder", "load_encoder", "load_text_encoder", "text_encoder_for"]


class ImageEncoder:
    """A loaded model's image tower behind one interface.

    Attributes:
        name: What it was loaded from (the spec given to :func:`load_encoder`).
        dim: Feature size D.
        transform: The model's own preprocessing, PIL image → ``[3, R, R]`` tensor.
        device: Where the model runs.
        info: ``{"role": …, "spec": …}`` plus what the checkpoint says (``kd_loss``, ``teacher``).
        model: The underlying module (kept so it stays alive).
    """

    def __init__(self, encode_fn: Callable[[torch.Tensor], torch.Tensor], *, name: str, dim: int,
                 transform: Callable[[Image.Image], torch.Tensor], device: str | torch.device = "cpu",
                 fingerprint: str, autocast_dtype: torch.dtype | None = None, info: dict | None = None,
                 model: torch.nn.Module | None = None):
        """Wrap a feature function.

        Args:
            encode_fn: Batch of transformed images (on ``device``) → ``[B, D]`` features, any scale.
            name: Display name / spec.
            dim: Feature size D.
            transform: PIL image → tensor, the model's own preprocessing.
            device: Where ``encode_fn`` runs.
            fingerprint: Identifies weights + preprocessing; keys the embedding cache.
            autocast_dtype: ``torch.float16`` / ``torch.bfloat16`` to run under autocast, or ``None``.
            info: Extra description (role, checkpoint facts).
            model: The module behind ``encode_fn``.
        """
        self._fn = encode_fn
        self.name = name
        self.dim = int(dim)
        self.transform = transform
        self.device = torch.device(device)
        self._fingerprint = fingerprint
        self.autocast_dtype = autocast_dtype
        self.info = dict(info or {})
        self.model = model

    def fingerprint(self) -> str:
        """Identifies the weights and preprocessing (a different model never shares embeddings)."""
        return self._fingerprint

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch made with :attr:`transform`.

        Args:
            images: ``[B, 3, R, R]`` tensor on any device.

        Returns:
            ``[B, D]`` L2-normalised float32 features on :attr:`device`.
        """
        images = images.to(self.device, non_blocking=True)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            feats = self._fn(images)
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def encode_pil(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> np.ndarray:
        """Features of PIL images (converted to RGB), in batches.

        Returns:
            ``[len(images), D]`` float32, L2-normalised rows.
        """
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.transform(im.convert("RGB")) for im in images[start:start + batch_size]])
            out.append(self.encode(batch).cpu().numpy())
        return np.concatenate(out)

    def __repr__(self) -> str:
        return f"ImageEncoder(name={self.name!r}, dim={self.dim}, device={self.device}, role={self.info.get('role')!r})"


def checkpoint_facts(path: Path) -> dict:
    """``kd_loss`` / ``teacher`` / ``name`` of a kit checkpoint, read without loading its tensors."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError) as err:  # an old (non-zip) file cannot be mmapped
        logger.debug("cannot mmap %s (%s); loading it", path, err)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        return {}
    return {k: ckpt.get(k) for k in ("kd_loss", "teacher", "name", "step", "context_length")}


def _role(facts: Mapping[str, Any]) -> str:
    if facts.get("kd_loss"):
        return f"distilled 蒸馏 ({facts['kd_loss']})"
    return "fine-tuned 微调"


def load_encoder(spec: str | os.PathLike, *, device: str | torch.device | None = None,
                 vision_model: str | None = None, text_model: str | None = None,
                 precision: str = "auto") -> ImageEncoder:
    """Load an image encoder by spec.

    Args:
        spec: A student checkpoint (``*.pt``, through :func:`cnclip_kd.models.students.load_student`);
            a cn_clip pretrained name (``"ViT-B-16"`` …); ``"teacher:<name>"`` with anything
            :func:`cnclip_kd.models.teachers.load_teacher` takes (hub id, ModelScope folder,
            ``cnclip:ARCH``, ``random:...``, cn_clip checkpoint); or a ModelScope teacher folder.
        device: Default: ``cuda`` when available, else ``cpu``.
        vision_model: Architecture of a checkpoint that does not record it.
        text_model: Likewise.
        precision: ``auto`` (bf16/fp16 autocast on a GPU, fp32 on a CPU), ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        The encoder, in eval mode.

    Raises:
        cnclip_kd.models.students.ModelLoadError: Unknown spec or unreadable checkpoint.
        cnclip_kd.models.teachers.TeacherLoadError: The teacher could not be loaded.
    """
    from ..core.precision import resolve_precision
    from ..models.students import PRETRAINED, ModelLoadError, image_transform, load_student

    spec = str(spec)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = resolve_precision(precision, dev)
    path = Path(spec).expanduser()
    teacher_name = spec[len("teacher:"):] if spec.startswith("teacher:") else None
    if teacher_name is None and path.is_dir() and (path / "configuration.json").is_file():
        teacher_name = str(path)
    if teacher_name is not None:
        from ..models.teachers import load_teacher

        teacher = load_teacher(teacher_name, device=dev, vision_model=vision_model, text_model=text_model)
        return ImageEncoder(teacher.encode_image, name=spec, dim=teacher.embed_dim, transform=teacher.transform,
                            device=dev, fingerprint=f"teacher-{teacher.fingerprint()}", autocast_dtype=autocast,
                            info={"role": "teacher 教师", "spec": spec, "kind": teacher.kind,
                                  "teacher": teacher.name},
                            model=teacher)
    if not path.is_file() and spec not in PRETRAINED:
        raise ModelLoadError(
            f"{spec}: not a model. Give a student checkpoint (*.pt), a cn_clip pretrained name "
            f"{sorted(PRETRAINED)}, 'teacher:<hub id | ModelScope folder | cnclip:ARCH | random:ARCH>' "
            "or a ModelScope teacher folder")
    kwargs = {k: v for k, v in (("vision_model", vision_model), ("text_model", text_model)) if v}
    model, info = load_student(spec, **kwargs)  # first: its errors name the file and the fix
    if path.is_file():
        facts = checkpoint_facts(path)
        info_extra = {"role": _role(facts), "spec": str(path.resolve()), **facts}
    else:
        info_extra = {"role": "pretrained 预训练", "spec": spec}
    model = model.to(dev).eval()
    resolution = int(info["image_resolution"])
    fingerprint = weights_fingerprint(model.visual, {"kind": "cnclip-student", "resolution": resolution,
                                                     "proj": tuple(model.visual.proj.shape)
                                                     if getattr(model.visual, "proj", None) is not None else None})
    return ImageEncoder(model.encode_image, name=spec, dim=int(info["embed_dim"]), transform=image_transform(resolution),
                        device=dev, fingerprint=f"student-{fingerprint}", autocast_dtype=autocast,
                        info=info_extra, model=model)




# --------------------------------------------------------------------------- text


def _cnclip_text_fn(clip: torch.nn.Module, device: torch.device, context_length: int) -> Callable[[Sequence[str]], torch.Tensor]:
    """Texts → cn_clip ``CLIP.encode_text`` features (the model's own ``[PAD]`` mask, rows trimmed to the longest)."""
    from ..core.tokenizer import tokenize

    def encode(texts: Sequence[str]) -> torch.Tensor:
        # Trimming the shared zero padding gives the same features (padding is masked) for less work.
        ids = tokenize(texts, context_length, pad_to_context=False).ids
        return clip.encode_text(torch.from_numpy(ids).to(device))

    return encode


def _team_text_fn(model: torch.nn.Module, device: torch.device) -> Callable[[Sequence[str]], torch.Tensor]:
    """Texts → TEAM text features through TEAM's own tokenizer (``tokenize_text``, 30 tokens) and ``get_feature``."""

    def encode(texts: Sequence[str]) -> torch.Tensor:
        pairs = [model.tokenize_text(t) for t in texts]
        ids = torch.cat([p[0] for p in pairs]).to(device)
        mask = torch.cat([p[1] for p in pairs]).to(device)
        return model.model.get_feature(ids, mask, None)[0]

    return encode


class TextEncoder:
    """A loaded model's text tower behind one interface (the text side of :class:`ImageEncoder`).

    Attributes:
        name: What it was loaded from (the model spec).
        dim: Feature size D (the joint image–text space of the model).
        context_length: Tokens per text, ``[CLS]``/``[SEP]`` included; longer texts are cut.
        device: Where the model runs.
        info: ``{"role": …, "spec": …, "kind": …}``.
        model: The underlying module (kept so it stays alive).
    """

    def __init__(self, encode_fn: Callable[[Sequence[str]], torch.Tensor], *, name: str, dim: int,
                 context_length: int, count_tokens: Callable[[str], int], fingerprint: str,
                 device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                 info: dict | None = None, model: torch.nn.Module | None = None):
        """Wrap a text feature function.

        Args:
            encode_fn: Raw texts (already through :func:`cnclip_kd.core.tokenizer.preprocess_text` where the
                model's tokenizer expects it) → ``[B, D]`` features, any scale.
            name: Display name / spec.
            dim: Feature size D.
            context_length: Tokens per text the model sees.
            count_tokens: Text → tokens it would take uncut (``[CLS]``/``[SEP]`` included).
            fingerprint: Identifies the text tower's weights and tokenisation; keys caches.
            device: Where ``encode_fn`` runs.
            autocast_dtype: ``torch.float16`` / ``torch.bfloat16`` to run under autocast, or ``None``.
            info: Extra description.
            model: The module behind ``encode_fn``.
        """
        self._fn = encode_fn
        self._count = count_tokens
        self.name = name
        self.dim = int(dim)
        self.context_length = int(context_length)
        self._fingerprint = fingerprint
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.info = dict(info or {})
        self.model = model

    def fingerprint(self) -> str:
        """Identifies the text tower's weights and tokenisation."""
        return self._fingerprint

    def truncated(self, text: str) -> bool:
        """Whether ``text`` has more tokens than :attr:`context_length` (its end is not seen)."""
        return self._count(text) > self.context_length

    @torch.inference_mode()
    def encode(self, texts: str | Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """Features of texts, in batches.

        Texts are used as given (no query checks: see :func:`cnclip_kd.core.tokenizer.check_query`);
        a text longer than the context length is cut, as in training.

        Returns:
            ``[N, D]`` float32, L2-normalised rows.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = [np.zeros((0, self.dim), np.float32)]
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        for start in range(0, len(texts), batch_size):
            with ctx:
                feats = self._fn(list(texts[start:start + batch_size]))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def __repr__(self) -> str:
        return (f"TextEncoder(name={self.name!r}, dim={self.dim}, context_length={self.context_length}, "
                f"device={self.device})")


def _cnclip_text_encoder(clip: torch.nn.Module, *, name: str, context_length: int, device: torch.device,
                         autocast: torch.dtype | None, info: dict) -> TextEncoder:
    from ..core.tokenizer import tokenize

    state = {k: v for k, v in clip.state_dict().items() if k.startswith("bert.") or k == "text_projection"}
    dim = int(clip.text_projection.shape[1])
    fingerprint = weights_fingerprint(state, {"kind": "cnclip-text", "context_length": int(context_length),
                                               "dim": dim})
    return TextEncoder(_cnclip_text_fn(clip, device, int(context_length)), name=name, dim=dim,
                       context_length=int(context_length),
                       count_tokens=lambda text: int(tokenize(text, 10 ** 6, pad_to_context=False).lengths[0]),
                       fingerprint=f"text-{fingerprint}", device=device, autocast_dtype=autocast, info=info,
                       model=clip)


def text_encoder_for(encoder: ImageEncoder, *, context_length: int | None = None) -> TextEncoder:
    """The text tower of the model behind an image encoder (same weights, same device, no second load).

    Args:
        encoder: From :func:`load_encoder`.
        context_length: Tokens per text; default what the checkpoint was trained with
            (cn_clip's 52 when it does not say).

    Raises:
        NoTextTowerError: The model has no text tower the kit can use (EfficientNet-Lite,
            timm and RLEG teachers); the message names the model.
    """
    from ..core.tokenizer import CONTEXT_LENGTH

    model = encoder.model
    kind = encoder.info.get("kind")
    info = {**encoder.info}
    length = int(context_length or encoder.info.get("context_length") or CONTEXT_LENGTH)
    if kind is None and model is not None and hasattr(model, "encode_text"):  # a cn_clip student
        return _cnclip_text_encoder(model, name=encoder.name, context_length=length, device=encoder.device,
                                    autocast=encoder.autocast_dtype, info=info)
    if kind == "cnclip":
        return _cnclip_text_encoder(model.model, name=encoder.name, context_length=length, device=encoder.device,
                                    autocast=encoder.autocast_dtype, info=info)
    if kind == "clip":
        return _cnclip_text_encoder(model.model.clip_model, name=encoder.name, context_length=length,
                                    device=encoder.device, autocast=encoder.autocast_dtype, info=info)
    if kind == "team":
        team = model.model
        state = {k: v for k, v in team.model.state_dict().items() if k.startswith("text_model.")}
        fingerprint = weights_fingerprint(state, {"kind": "team-text", "context_length": 30})

        def count(text: str) -> int:
            enc = team.text_tokenizer.encode(text)
            return len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)

        return TextEncoder(_team_text_fn(team, encoder.device), name=encoder.name, dim=encoder.dim,
                           context_length=30, count_tokens=count, fingerprint=f"text-{fingerprint}",
                           device=encoder.device, autocast_dtype=encoder.autocast_dtype, info=info, model=team)
    what = {"efficientnet": "an image-only model (EfficientNet-Lite)", "timm": "an image-only timm model",
            "rleg": "an RLEG teacher, whose English BPE text tower the kit does not use"}.get(kind, f"a {kind} model")
    raise NoTextTowerError(f"{encoder.name}: {what} has no text tower for Chinese text queries; search it with "
                           "images, or use a Chinese-CLIP student or teacher for text → image")


def load_text_encoder(spec: str | os.PathLike, *, device: str | torch.device | None = None,
                      vision_model: str | None = None, text_model: str | None = None, precision: str = "auto",
                      context_length: int | None = None) -> TextEncoder:
    """Load a model's text tower by spec (as :func:`load_encoder` takes it).

    Args:
        spec: A student checkpoint, a cn_clip pretrained name, ``teacher:<…>`` or a ModelScope folder.
        device, vision_model, text_model, precision: As in :func:`load_encoder`.
        context_length: Tokens per text (default: the checkpoint's, else 52).

    Raises:
        NoTextTowerError: The model has no usable text tower (the message names it).
        cnclip_kd.models.students.ModelLoadError / cnclip_kd.models.teachers.TeacherLoadError: As :func:`load_encoder`.
    """
    encoder = load_encoder(spec, device=device, vision_model=vision_model, text_model=text_model,
                           precision=precision)
    return text_encoder_for(encoder, context_length=context_length)
