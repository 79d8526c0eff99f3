"""Precision and threading choices shared by training, encoding and deployment.

torch is imported inside each function, so importing this module stays
torch-free (the ONNX serving path imports :mod:`cnclip_kd.core`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["native_bf16", "resolve_precision", "resolve_teacher_precision", "set_torch_threads"]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name on a device.

    Args:
        precision: ``auto`` (bf16 or fp16 on CUDA, fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16``.
        device: Where the model runs.

    Returns:
        The autocast dtype, or ``None`` for plain fp32.
    """
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_teacher_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a frozen teacher: as :func:`resolve_precision` (``auto`` on a GPU: bf16, or fp16
    without bf16), except that ``auto`` is bf16 on a CPU that computes bf16 natively (:func:`native_bf16`).

    A frozen teacher only runs forward, where bf16 costs little accuracy (EfficientNet-Lite2: test P@10 0.452 in
    bf16 vs 0.453 in fp32) and about half the CPU time (44 vs 94 ms per 260 px image, ``benchmarks/teacher_cost.py``);
    without native bf16 (AVX2 only) it is emulated and slower than fp32, so ``auto`` keeps fp32 there.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: Where the teacher runs.

    Raises:
        ValueError: Unknown precision name.
    """
    import torch

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown teacher precision {precision!r}; choose auto, fp32, bf16 or fp16")
    if precision == "auto" and device.type == "cpu":
        return torch.bfloat16 if native_bf16() else None
    return resolve_precision(precision, device)


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 / AMX). Without it bf16 autocast is
    emulated and several times slower than fp32 (measured: 6× on an AVX2-only EPYC)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def set_torch_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count (process-wide: torch has one pool); ``None``/0 leaves it."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))
