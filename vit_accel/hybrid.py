"""The ResNet stem of the hybrid ViT (Dosovitskiy et al., 2020, R50+ViT-B/16): a BiT ResNet v2 trunk.

BiT layers: convolutions with weight standardization and TF "SAME" padding, GroupNorm (32
groups) instead of BatchNorm, non-pre-activation bottlenecks. With ``layers=(3, 4, 9)`` it is
the first three stages of a ResNet-50 (stride 16, 1024 channels), whose feature map becomes the
tokens of the ViT (a 1x1 "patch" projection on it). Module and parameter names follow timm's
``ResNetV2`` (``stem.conv``, ``stem.norm``, ``stages.N.blocks.M.conv1`` ... ``downsample.conv``), so
a timm ``vit_base_r50_s16_384`` state dict loads under ``patch_embed.backbone.`` unmapped.

Numerics follow timm's hybrid (the parity oracle): weight standardization eps 1e-8, GroupNorm
eps 1e-5, max-pool padding with -inf. Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

STEM_WIDTH = 64
STAGE_CHANNELS = (256, 512, 1024, 2048)
GROUPS = 32


def stem_stride(layers: Sequence[int]) -> int:
    """Pixels per feature-map cell: 4 (stem conv + pool), then x2 per stage after the first."""
    return 4 * 2 ** (len(layers) - 1) if layers else 1


def stem_channels(layers: Sequence[int]) -> int:
    """Channels of the stem's output feature map."""
    return STAGE_CHANNELS[len(layers) - 1]


def _same_pad(size: int, k: int, s: int) -> Tuple[int, int]:
    """TF 'SAME' padding (before, after) of one spatial axis."""
    pad = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return pad // 2, pad - pad // 2


class StdConv2dSame(nn.Conv2d):
    """Conv2d on a weight standardized per output channel (zero mean, unit variance), SAME padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        ph, pw = _same_pad(x.shape[-2], k, s), _same_pad(x.shape[-1], k, s)
        if sum(ph) or sum(pw):
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        w = self.weight.reshape(self.out_channels, -1)
        var, mean = torch.var_mean(w, dim=1, unbiased=False, keepdim=True)
        w = ((w - mean) / torch.sqrt(var + self.eps)).reshape_as(self.weight)
        return F.conv2d(x, w, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32) followed by ReLU unless ``act=False``."""

    def __init__(self, channels: int, act: bool = True, eps: float = 1e-5):
        super().__init__(GROUPS, channels, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.act else x


class Downsample(nn.Module):
    """The projection shortcut of a stage's first block: 1x1 conv (strided) + GroupNorm."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 1, stride)
        self.norm = GroupNormAct(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with GroupNorm after each, residual add, ReLU (ResNet v1.5 order)."""

    def __init__(self, cin: int, cout: int, stride: int, project: bool):
        super().__init__()
        mid = cout // 4
        self.downsample = Downsample(cin, cout, stride) if project else None
        self.conv1 = StdConv2dSame(cin, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2dSame(mid, cout, 1)
        self.norm3 = GroupNormAct(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1, i == 0)
                                      for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    """7x7/2 conv, GroupNorm + ReLU, 3x3/2 max-pool (SAME padding with -inf)."""

    def __init__(self, in_chans: int):
        super().__init__()
        self.conv = StdConv2dSame(in_chans, STEM_WIDTH, 7, 2)
        self.norm = GroupNormAct(STEM_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        ph, pw = _same_pad(x.shape[-2], 3, 2), _same_pad(x.shape[-1], 3, 2)
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=float("-inf"))
        return F.max_pool2d(x, 3, 2)


class ResNetStem(nn.Module):
    """images (B, C, H, W) -> features (B, stem_channels, H / stride, W / stride)."""

    def __init__(self, layers: Sequence[int], in_chans: int = 3):
        super().__init__()
        if not 1 <= len(layers) <= len(STAGE_CHANNELS) or any(n < 1 for n in layers):
            raise ValueError("hybrid_layers must be 1 to %d positive block counts (R50: 3, 4, 9), got %s"
                             % (len(STAGE_CHANNELS), list(layers)))
        self.stem = Stem(in_chans)
        cin, stages = STEM_WIDTH, []
        for i, n in enumerate(layers):
            stages.append(Stage(cin, STAGE_CHANNELS[i], n, 1 if i == 0 else 2))
            cin = STAGE_CHANNELS[i]
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


# ---------------------------------------------------------------------------------------
# Analytic counts (no model is built): parameters and multiply-adds per image
# ---------------------------------------------------------------------------------------

def _convs(layers: Sequence[int], in_chans: int, img_size: int) -> List[Tuple[int, int, int, int, bool]]:
    """Every conv of the stem as (cin, cout, kernel, output side, followed by GroupNorm)."""
    side = math.ceil(img_size / 2)
    out = [(in_chans, STEM_WIDTH, 7, side, True)]
    side = math.ceil(side / 2)
    cin = STEM_WIDTH
    for i, n in enumerate(layers):
        cout = STAGE_CHANNELS[i]
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            new = math.ceil(side / stride)
            if j == 0:
                out.append((cin, cout, 1, new, True))
            out += [(cin if j == 0 else cout, cout // 4, 1, side, True), (cout // 4, cout // 4, 3, new, True),
                    (cout // 4, cout, 1, new, True)]
            side = new
        cin = cout
    return out


def stem_counts(layers: Sequence[int], in_chans: int, img_size: int) -> Dict[str, int]:
    """{"params", "macs"} of the stem at ``img_size`` (convolutions; GroupNorm adds parameters only)."""
    params = macs = 0
    for cin, cout, k, side, norm in _convs(layers, in_chans, img_size):
        params += cin * cout * k * k + (2 * cout if norm else 0)
        macs += cin * cout * k * k * side * side
    return {"params": params, "macs": macs}
