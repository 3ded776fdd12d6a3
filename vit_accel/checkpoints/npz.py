"""Google ViT ``.npz`` checkpoints <-> timm-keyed state dicts.

Reads the naming of google-research/vision_transformer (``vit_jax``: ``encoderblock_N``,
``MultiHeadDotProductAttention_1``, ``LayerNorm_0/2``, ``MlpBlock_3``, ``posembed_input``) and of
big_vision (``MultiHeadDotProductAttention_0``, ``LayerNorm_0/1``, ``MlpBlock_0``, a root
``pos_embedding`` without a class-token slot, optionally one scanned ``encoderblock`` whose arrays
carry the depth as a leading axis), and the R50 stem of the hybrid (``conv_root``, ``gn_root``,
``blockN/unitM/{conv,gn}{1,2,3}``, ``conv_proj``/``gn_proj``). Writes the ``vit_jax`` naming. Flax stores a Dense kernel as
(in, out), attention kernels split per head ((D, heads, hd) for q/k/v, (heads, hd, D) for the
output) and a Conv kernel as HWIO; torch wants (out, in) and OIHW.
Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

# Our own config rides along as a uint8 array under this key; Google's loaders never look at it.
CONFIG_KEY = "vit_accel/config"


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def npz_to_timm(arrays: Mapping[str, np.ndarray]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], List[str]]:
    """Google arrays -> (timm-keyed tensors, hints such as num_heads, notes). Unknown arrays pass
    through under their own names so that the loader can report them as unexpected."""
    notes: List[str] = []
    hints: Dict[str, Any] = {"layer_norm_eps": 1e-6}  # flax LayerNorm's default
    if CONFIG_KEY in arrays:
        hints["vit_config"] = json.loads(bytes(np.asarray(arrays[CONFIG_KEY]).tobytes()).decode("utf-8"))
    # Old vit_jax files nest the params under "opt/target/", some big_vision exports under "params/".
    roots = [k[: -len("embedding/kernel")] for k in arrays if k.endswith("embedding/kernel")]
    prefix = min(roots, key=len) if roots else ""
    w = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix) and k != CONFIG_KEY}
    used = set()

    def get(name: str, idx: Optional[int] = None) -> Optional[np.ndarray]:
        if name not in w:
            return None
        used.add(name)
        return w[name] if idx is None else w[name][idx]

    out: Dict[str, torch.Tensor] = {}

    def put(key: str, a: Optional[np.ndarray], fn=lambda a: a) -> None:
        if a is not None:
            out[key] = _t(fn(a))

    put("patch_embed.proj.weight", get("embedding/kernel"), lambda a: a.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    put("patch_embed.proj.bias", get("embedding/bias"))
    put("cls_token", get("cls"))
    pos = get("Transformer/posembed_input/pos_embedding")
    if pos is None:
        pos = get("pos_embedding")  # big_vision
    if pos is not None:
        if "cls" in w and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
            # big_vision adds positions before prepending the class token: its slot is zero.
            pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
            notes.append("position table has no class-token slot; a zero slot was prepended")
        put("pos_embed", pos)
    for src, dst in (("Transformer/encoder_norm", "norm"), ("pre_logits", "pre_logits.fc"), ("head", "head")):
        if src + "/scale" in w:
            put(dst + ".weight", get(src + "/scale"))
        put(dst + ".weight", get(src + "/kernel"), lambda a: a.T)
        put(dst + ".bias", get(src + "/bias"))

    _stem_to_timm(w, get, put)
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    big_vision = any("MultiHeadDotProductAttention_0" in k for k in w)
    mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else \
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    if scanned:
        depth = w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = 0
        while "Transformer/encoderblock_%d/LayerNorm_0/scale" % depth in w:
            depth += 1
    for i in range(depth):
        bp, idx = ("Transformer/encoderblock/", i) if scanned else ("Transformer/encoderblock_%d/" % i, None)
        b = "blocks.%d." % i
        put(b + "norm1.weight", get(bp + "LayerNorm_0/scale", idx))
        put(b + "norm1.bias", get(bp + "LayerNorm_0/bias", idx))
        qkv = [get(bp + mha + "/" + n + "/kernel", idx) for n in ("query", "key", "value")]
        if all(k is not None for k in qkv):
            hints["num_heads"] = int(qkv[0].shape[1])
            out[b + "attn.qkv.weight"] = torch.cat([_t(k.reshape(k.shape[0], -1).T) for k in qkv])
        qkv_b = [get(bp + mha + "/" + n + "/bias", idx) for n in ("query", "key", "value")]
        if all(k is not None for k in qkv_b):
            out[b + "attn.qkv.bias"] = torch.cat([_t(k.reshape(-1)) for k in qkv_b])
        put(b + "attn.proj.weight", get(bp + mha + "/out/kernel", idx), lambda a: a.reshape(-1, a.shape[-1]).T)
        put(b + "attn.proj.bias", get(bp + mha + "/out/bias", idx))
        put(b + "norm2.weight", get(bp + ln2 + "/scale", idx))
        put(b + "norm2.bias", get(bp + ln2 + "/bias", idx))
        for j in (0, 1):
            put(b + "mlp.fc%d.weight" % (j + 1), get(bp + mlp + "/Dense_%d/kernel" % j, idx), lambda a: a.T)
            put(b + "mlp.fc%d.bias" % (j + 1), get(bp + mlp + "/Dense_%d/bias" % j, idx))
    for k, v in w.items():
        if k not in used:
            out[k] = _t(v)  # reported as unexpected (e.g. big_vision's MAPHead_0)
    return out, hints, notes


# The hybrid's ResNet stem (vit_jax models_resnet): timm name under patch_embed.backbone. <-> Google name
_STEM = "patch_embed.backbone."


def _stem_names(w_or_sd, google: bool) -> List[Tuple[str, str]]:
    """(timm key, Google key) pairs of every stem tensor present, read off whichever side is given."""
    if ("conv_root/kernel" if google else _STEM + "stem.conv.weight") not in w_or_sd:
        return []
    pairs = [("stem.conv.weight", "conv_root/kernel"), ("stem.norm.weight", "gn_root/scale"),
             ("stem.norm.bias", "gn_root/bias")]
    i = 0
    while ("block%d/unit1/conv1/kernel" % (i + 1)) in w_or_sd if google else \
            (_STEM + "stages.%d.blocks.0.conv1.weight" % i) in w_or_sd:
        j = 0
        while ("block%d/unit%d/conv1/kernel" % (i + 1, j + 1)) in w_or_sd if google else \
                (_STEM + "stages.%d.blocks.%d.conv1.weight" % (i, j)) in w_or_sd:
            t, g = "stages.%d.blocks.%d." % (i, j), "block%d/unit%d/" % (i + 1, j + 1)
            for r in (1, 2, 3):
                pairs += [(t + "conv%d.weight" % r, g + "conv%d/kernel" % r), (t + "norm%d.weight" % r, g + "gn%d/scale" % r),
                          (t + "norm%d.bias" % r, g + "gn%d/bias" % r)]
            if j == 0:
                pairs += [(t + "downsample.conv.weight", g + "conv_proj/kernel"),
                          (t + "downsample.norm.weight", g + "gn_proj/scale"), (t + "downsample.norm.bias", g + "gn_proj/bias")]
            j += 1
        i += 1
    return [(_STEM + t, g) for t, g in pairs]


def _stem_to_timm(w, get, put) -> None:
    for t, g in _stem_names(w, google=True):
        a = get(g)
        if a is not None:  # conv kernels HWIO -> OIHW; GroupNorm parameters may be stored as (1, 1, 1, C)
            put(t, a, (lambda a: a.transpose(3, 2, 0, 1)) if g.endswith("kernel") else (lambda a: a.reshape(-1)))


def timm_to_npz(sd: Mapping[str, torch.Tensor], num_heads: int, config: Optional[dict] = None) -> Dict[str, np.ndarray]:
    """timm-keyed state dict -> arrays in vit_jax naming (plus our config, when given)."""
    def n(key: str) -> np.ndarray:
        t = sd[key].detach().cpu()
        if t.dtype not in (torch.float32, torch.float16, torch.float64):
            t = t.float()  # numpy has no bfloat16
        return t.numpy()

    a: Dict[str, np.ndarray] = {
        "embedding/kernel": n("patch_embed.proj.weight").transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": n("patch_embed.proj.bias"),
        "cls": n("cls_token"),
        "Transformer/posembed_input/pos_embedding": n("pos_embed"),
        "Transformer/encoder_norm/scale": n("norm.weight"),
        "Transformer/encoder_norm/bias": n("norm.bias"),
    }
    for t, g in _stem_names(sd, google=False):
        a[g] = n(t).transpose(2, 3, 1, 0) if g.endswith("kernel") else n(t)
    for dst, src in (("pre_logits", "pre_logits.fc"), ("head", "head")):
        if src + ".weight" in sd:
            a[dst + "/kernel"] = n(src + ".weight").T
            a[dst + "/bias"] = n(src + ".bias")
    i = 0
    while "blocks.%d.norm1.weight" % i in sd:
        b, bp = "blocks.%d." % i, "Transformer/encoderblock_%d/" % i
        mha = bp + "MultiHeadDotProductAttention_1/"
        qkv = n(b + "attn.qkv.weight")
        width = qkv.shape[1]
        hd = width // num_heads
        for j, name in enumerate(("query", "key", "value")):
            a[mha + name + "/kernel"] = qkv[j * width:(j + 1) * width].T.reshape(width, num_heads, hd)
            if b + "attn.qkv.bias" in sd:
                a[mha + name + "/bias"] = n(b + "attn.qkv.bias")[j * width:(j + 1) * width].reshape(num_heads, hd)
        a[mha + "out/kernel"] = n(b + "attn.proj.weight").T.reshape(num_heads, hd, width)
        a[mha + "out/bias"] = n(b + "attn.proj.bias")
        for ln, src in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            a[bp + ln + "/scale"] = n(b + src + ".weight")
            a[bp + ln + "/bias"] = n(b + src + ".bias")
        for j in (0, 1):
            a[bp + "MlpBlock_3/Dense_%d/kernel" % j] = n(b + "mlp.fc%d.weight" % (j + 1)).T
            a[bp + "MlpBlock_3/Dense_%d/bias" % j] = n(b + "mlp.fc%d.bias" % (j + 1))
        i += 1
    a = {k: np.ascontiguousarray(v) for k, v in a.items()}
    if config is not None:
        a[CONFIG_KEY] = np.frombuffer(json.dumps(config).encode("utf-8"), dtype=np.uint8)
    return a
