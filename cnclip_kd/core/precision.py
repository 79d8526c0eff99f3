"""Precision and threading choices shared by training, encoding and deployment.

torch is imported inside each function, so importing this module stays
torch-free (the ONNX serving path imports :mod:`cnclip_kd.core`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["native_bf16", "resolve_precision", "set_torch_threads"]


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
