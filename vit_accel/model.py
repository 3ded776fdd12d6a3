"""The Vision Transformer (Dosovitskiy et al., 2020): one module tree for every backend.

Ops are chosen at construction (``attn_impl``, ``norm_impl``, ``mlp_impl``) and recorded on
the modules; the parameter tree, and so the state_dict, is the same whatever the ops.
State-dict keys follow timm (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``norm``, ``head``).
No device code lives here. Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hybrid import ResNetStem, stem_channels, stem_counts, stem_stride
from .variants import VARIANT_OPTIONS, VARIANTS

ATTN_IMPLS = ("eager", "sdpa", "triton")
NORM_IMPLS = ("torch", "triton")
MLP_IMPLS = ("torch", "triton")

# Ops every torch runs (no Triton, no device): a backend's default and what checkpoints record
PORTABLE_OPS = {"attn_impl": "sdpa", "norm_impl": "torch", "mlp_impl": "torch"}


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: Optional[float] = None      # softmax scale; None = head_dim ** -0.5
    hybrid_layers: Tuple[int, ...] = ()   # ResNet v2 stem blocks per stage, () = plain patches; R50: (3, 4, 9)
    layer_norm_eps: float = 1e-6
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    representation_size: Optional[int] = None
    global_pool: str = "token"
    fc_norm: bool = False                 # LayerNorm after pooling, not before (timm's avg-pool default, MAE fine-tunes)
    gelu_approximate: str = "none"
    pos_embed_std: float = 0.02           # init scale; small data learns faster with ~0.5-1
    attn_impl: str = "sdpa"
    norm_impl: str = "torch"
    mlp_impl: str = "torch"
    name: str = field(default="custom", compare=False)
    # what each output means (HF's id2label, timm's label_names); () = unnamed. Not part of the function
    # the model computes, so configs that differ only here compare equal.
    class_names: Tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError("ViTConfig: " + msg)

        self.hybrid_layers = tuple(int(n) for n in self.hybrid_layers or ())  # JSON gives a list
        stride = self.patch_size * stem_stride(self.hybrid_layers)
        check(self.img_size % stride == 0,
              f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
              + (f" x the ResNet stem's stride {stem_stride(self.hybrid_layers)}" if self.hybrid_layers else ""))
        check(self.width % self.num_heads == 0,
              f"width {self.width} is not divisible by num_heads {self.num_heads}")
        check(self.global_pool in ("token", "avg"), f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        check(self.gelu_approximate in ("none", "tanh"),
              f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")
        check(self.attn_impl in ATTN_IMPLS, f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        check(self.norm_impl in NORM_IMPLS, f"norm_impl must be one of {NORM_IMPLS}, got {self.norm_impl!r}")
        check(self.mlp_impl in MLP_IMPLS, f"mlp_impl must be one of {MLP_IMPLS}, got {self.mlp_impl!r}")
        check(self.num_classes >= 0, "num_classes must be >= 0 (0 = no head)")
        self.class_names = tuple(str(n) for n in self.class_names or ())  # JSON gives a list
        check(not self.class_names or len(self.class_names) == self.num_classes,
              f"{len(self.class_names)} class_names for num_classes {self.num_classes}")

    @property
    def grid_size(self) -> int:
        return self.img_size // (self.patch_size * stem_stride(self.hybrid_layers))

    @property
    def embed_in_chans(self) -> int:
        """Channels the patch projection sees: the image's, or the ResNet stem's feature map's."""
        return stem_channels(self.hybrid_layers) if self.hybrid_layers else self.in_chans

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def class_name(self, index: int) -> str:
        """What output ``index`` means: its name, or "class N" for a model without names."""
        return self.class_names[index] if self.class_names else f"class {index}"

    def to_dict(self) -> dict:
        return asdict(self)

    def portable_dict(self) -> dict:
        """``to_dict`` with the ops torch runs anywhere (what a checkpoint records: eval/convert anywhere)."""
        return dict(self.to_dict(), **PORTABLE_OPS)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare ViT inside DDP / DeepSpeed / torch.compile / PopTorch wrappers (their ``module``, ``_orig_mod`` or ``model``)."""
    for attr in ("module", "_orig_mod", "model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module) and inner is not model:
            return unwrap(inner)
    return model


def vit_config(name: str, **overrides) -> ViTConfig:
    """Decode a variant name from the table, then apply overrides (img_size, num_classes, ...)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; known: {', '.join(VARIANTS)}")
    width, depth, heads, mlp_ratio, patch = VARIANTS[name]
    base = dict(width=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, patch_size=patch, name=name)
    base.update(VARIANT_OPTIONS.get(name, {}))
    known = {f.name for f in fields(ViTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown ViT option(s) {bad}; valid: {sorted(known)}")
    base.update(overrides)
    return ViTConfig(**base)


def _kernel(module: str, option: str, portable: str):
    """The Triton kernel module for an op chosen as 'triton', or an error saying what to choose
    instead: the kernels run on a CUDA device, or on the CPU under TRITON_INTERPRET=1."""
    import importlib

    try:
        mod = importlib.import_module("vit_accel_kernels." + module)
    except ImportError as e:  # triton missing, or kernels not installed
        raise NotImplementedError(
            f"{option}='triton' needs the kernels package and triton ({e}); "
            f"install vit-accel with the [gpu] extra, or choose {option}='{portable}'") from e
    if not (torch.cuda.is_available() or importlib.import_module("vit_accel_kernels").INTERPRETING):
        raise ValueError(
            f"{option}='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before the kernels are "
            f"imported) and this process has neither; choose {option}='{portable}' to run on the CPU")
    return mod


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth per sample (drops the residual branch)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that can run the fused Triton kernel, with an optional residual add.

    ``forward(x, residual)`` returns ``(LayerNorm(x + residual), x + residual)``.
    """

    def __init__(self, dim: int, eps: float, impl: str = "torch"):
        super().__init__(dim, eps=eps)
        self.impl = impl
        self._k = _kernel("layer_norm", "norm_impl", "torch") if impl == "triton" else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if self._k is not None:
            return self._k.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
        if residual is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        h = x + residual
        return F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps), h


class PatchEmbed(nn.Module):
    """Patches -> tokens; a hybrid first runs the ResNet stem (``backbone``) and patches its feature map."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.backbone = ResNetStem(cfg.hybrid_layers, cfg.in_chans) if cfg.hybrid_layers else None
        self.proj = nn.Conv2d(cfg.embed_in_chans, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H != self.img_size or W != self.img_size:
            raise ValueError(f"input is {H}x{W} but the model was built for {self.img_size}x{self.img_size}")
        if self.backbone is not None:
            x = self.backbone(x)  # (B, 1024, H / 16, W / 16) for R50
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.qk_scale or self.head_dim ** -0.5
        # sdpa scales by head_dim ** -0.5 (torch 2.0 has no scale argument): q carries the rest
        self.q_factor = None if cfg.qk_scale is None else self.scale * self.head_dim ** 0.5
        self.impl = cfg.attn_impl
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.attn_drop = nn.Dropout(cfg.attn_drop_rate)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.proj_drop = nn.Dropout(cfg.drop_rate)
        self._k = None
        if self.impl == "triton":
            if cfg.attn_drop_rate > 0:
                raise ValueError("attn_impl='triton' has no attention-probability dropout; "
                                 "set attn_drop_rate=0 or use attn_impl='sdpa'")
            self._k = _kernel("attention", "attn_impl", "sdpa")

    def extra_repr(self) -> str:
        return f"impl={self.impl}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, N, hd)
        if self.impl == "eager":
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, N, N)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        elif self.impl == "sdpa":
            p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(self._rescale(q), k, v, dropout_p=p)
        else:
            x = self._k.flash_attention(q, k, v, softmax_scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))

    def _rescale(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.q_factor is None else q * self.q_factor


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.impl = cfg.mlp_impl
        self.approximate = cfg.gelu_approximate
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.act = nn.GELU(approximate=cfg.gelu_approximate)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)
        self.drop = nn.Dropout(cfg.drop_rate)
        self._k = _kernel("bias_gelu", "mlp_impl", "torch") if self.impl == "triton" else None

    def extra_repr(self) -> str:
        return f"impl={self.impl}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._k is not None:
            # fc1 without its bias; the bias add is fused into the GELU kernel
            x = self._k.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, approximate=self.approximate)
        else:
            x = self.act(self.fc1(x))
        x = self.drop(x)
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, cfg.layer_norm_eps, cfg.norm_impl)
        self.attn = Attention(cfg)
        self.norm2 = LayerNorm(cfg.width, cfg.layer_norm_eps, cfg.norm_impl)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.drop_path(self.attn(self.norm1(x)))
        y, x = self.norm2(a, residual=x)  # one fused pass: h = x + a; y = norm2(h)
        return x + self.drop_path(self.mlp(y))


class PreLogits(nn.Module):
    """The dense + tanh layer of Google's in-21k checkpoints (``representation_size``)."""

    def __init__(self, width: int, size: int):
        super().__init__()
        self.fc = nn.Linear(width, size)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.width))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, dpr[i]) for i in range(cfg.depth)])
        # The final LayerNorm runs on every token, or (fc_norm) on the pooled features only.
        final_norm = LayerNorm(cfg.width, cfg.layer_norm_eps, cfg.norm_impl)
        self.norm = nn.Identity() if cfg.fc_norm else final_norm
        self.fc_norm = final_norm if cfg.fc_norm else nn.Identity()
        feat = cfg.width
        self.pre_logits = nn.Identity()
        if cfg.representation_size:
            self.pre_logits = PreLogits(cfg.width, cfg.representation_size)
            feat = cfg.representation_size
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(feat, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if not self.pos_embed.is_meta:  # meta tensors (sizes only) hold no values to initialize
            self.init_weights()

    def init_weights(self) -> None:
        """timm / big_vision initialization: trunc-normal pos-embed (0.02 by default), tiny cls
        token, zero head."""
        nn.init.trunc_normal_(self.pos_embed, std=self.cfg.pos_embed_std)  # cut at +-2, as timm
        nn.init.normal_(self.cls_token, std=1e-6)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # patch embedding as a linear layer on flattened patches (lecun-normal, as big_vision)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if isinstance(self.pre_logits, PreLogits):  # lecun-normal, as ClassyVision's VisionTransformerHead
            fc = self.pre_logits.fc
            nn.init.trunc_normal_(fc.weight, std=math.sqrt(1.0 / fc.in_features))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, 1 + N, D): patches, class token, positions."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, 1 + N, D), normalized unless the model has fc_norm."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1 + N, D) -> logits: pool (class token or mean), fc_norm, pre-logits, head."""
        x = x[:, 0] if self.cfg.global_pool == "token" else x[:, 1:].mean(dim=1)
        return self.head(self.head_drop(self.pre_logits(self.fc_norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops(self) -> int:
        """Forward FLOPs per image, counted analytically (2 per multiply-add)."""
        return 2 * count_macs(self.cfg)


def count_macs(cfg: ViTConfig) -> int:
    """Forward multiply-adds per image: (ResNet stem,) patch embedding, blocks, pre-logits and head."""
    n, t, d, h = cfg.num_patches, cfg.num_patches + 1, cfg.width, cfg.mlp_hidden
    patch = n * cfg.embed_in_chans * cfg.patch_size ** 2 * d
    if cfg.hybrid_layers:
        patch += stem_counts(cfg.hybrid_layers, cfg.in_chans, cfg.img_size)["macs"]
    block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * h
    feat = cfg.representation_size or d
    tail = (d * cfg.representation_size if cfg.representation_size else 0) + feat * cfg.num_classes
    return patch + cfg.depth * block + tail


def create_vit(name: str = "vit-b16", **overrides) -> ViT:
    """Build a variant from the table: ``create_vit("vit-b16", num_classes=10, attn_impl="triton")``."""
    return ViT(vit_config(name, **overrides))
