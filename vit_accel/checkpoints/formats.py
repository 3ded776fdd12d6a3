"""Key maps between timm names (the keys of ``ViT.state_dict()``) and MMClassification/mmpretrain and
HF transformers names, and key-pattern detection of a state dict's format.
Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch

FORMATS = ("timm", "mmcls", "hf", "npz", "vit-accel")

# (timm name, foreign name); "{i}" is a block index, a trailing "." a module prefix
MMCLS = [
    ("cls_token", "backbone.cls_token"),
    ("pos_embed", "backbone.pos_embed"),
    ("patch_embed.proj.", "backbone.patch_embed.projection."),
    ("blocks.{i}.norm1.", "backbone.layers.{i}.ln1."),
    ("blocks.{i}.attn.qkv.", "backbone.layers.{i}.attn.qkv."),
    ("blocks.{i}.attn.proj.", "backbone.layers.{i}.attn.proj."),
    ("blocks.{i}.norm2.", "backbone.layers.{i}.ln2."),
    ("blocks.{i}.mlp.fc1.", "backbone.layers.{i}.ffn.layers.0.0."),
    ("blocks.{i}.mlp.fc2.", "backbone.layers.{i}.ffn.layers.1."),
    ("norm.", "backbone.ln1."),  # the final norm (mmcls final_norm=True)
    ("pre_logits.fc.", "head.layers.pre_logits."),
    ("head.", "head.layers.head."),
]
_HF = [  # HF ViT as saved by save_pretrained (q/k/v are split, handled apart)
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("blocks.{i}.norm1.", "encoder.layer.{i}.layernorm_before."),
    ("blocks.{i}.attn.proj.", "encoder.layer.{i}.attention.output.dense."),
    ("blocks.{i}.norm2.", "encoder.layer.{i}.layernorm_after."),
    ("blocks.{i}.mlp.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("blocks.{i}.mlp.fc2.", "encoder.layer.{i}.output.dense."),
    ("norm.", "layernorm."),
    ("pre_logits.fc.", "pooler.dense."),  # ViTModel's dense+tanh pooler is Google's pre_logits
    ("head.", "classifier."),
]
_HF_V5 = [  # transformers >= 5 in-memory names (a torch.save'd model.state_dict()) -> saved names
    ("encoder.layer.{i}.attention.attention.query.", "layers.{i}.attention.q_proj."),
    ("encoder.layer.{i}.attention.attention.key.", "layers.{i}.attention.k_proj."),
    ("encoder.layer.{i}.attention.attention.value.", "layers.{i}.attention.v_proj."),
    ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.attention.o_proj."),
    ("encoder.layer.{i}.intermediate.dense.", "layers.{i}.mlp.fc1."),
    ("encoder.layer.{i}.output.dense.", "layers.{i}.mlp.fc2."),
    ("encoder.layer.{i}.", "layers.{i}."),
]
_QKV = ("query", "key", "value")


def rename(sd: Dict[str, torch.Tensor], table, to_timm: bool) -> Dict[str, torch.Tensor]:
    """Rename keys by a table; keys no rule matches pass through (and get reported as unexpected)."""
    rules = []
    for timm_name, other in table:
        src, dst = (other, timm_name) if to_timm else (timm_name, other)
        rx = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)") + ("" if src.endswith(".") else "$")
        rules.append((re.compile(rx), dst))
    out = {}
    for k, v in sd.items():
        for rx, dst in rules:
            m = rx.match(k)
            if m:
                k = dst.replace("{i}", m.groupdict().get("i") or "") + k[m.end():]
                break
        out[k] = v
    return out


def _strip(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def mmcls_to_timm(sd):
    """A full classifier (``backbone.``/``head.``) or a backbone-only state dict -> timm names."""
    # mmpretrain 1.x saves its normalization constants beside the weights: not part of the model
    sd = {k: v for k, v in _strip(sd, "module.").items() if not k.startswith("data_preprocessor.")}
    if not any(k.startswith(("backbone.", "head.")) for k in sd):  # a backbone-only file
        sd = {"backbone." + k: v for k, v in sd.items()}
    return rename(sd, MMCLS, to_timm=True)


def hf_to_timm(sd):
    """HF ViTForImageClassification / bare ViTModel names (saved or in-memory) -> timm; q/k/v fused."""
    sd = {(k[4:] if k.startswith("vit.") else k): v for k, v in _strip(sd, "module.").items()}
    sd = rename(sd, _HF_V5, to_timm=True)  # v5 names -> saved names
    out = rename(sd, _HF, to_timm=True)
    qkv = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.")
    for i in sorted({int(m.group(1)) for m in map(qkv.match, out) if m}):
        for kind in ("weight", "bias"):
            names = ["encoder.layer.%d.attention.attention.%s.%s" % (i, n, kind) for n in _QKV]
            if all(n in out for n in names):
                out["blocks.%d.attn.qkv.%s" % (i, kind)] = torch.cat([out.pop(n) for n in names])
    return out


def timm_to_hf(sd, with_prefix: bool):
    """timm -> saved HF names; ``with_prefix``: ViTForImageClassification (``vit.``), else ViTModel."""
    sd = dict(sd)
    for k in [k for k in sd if re.match(r"blocks\.\d+\.attn\.qkv\.", k)]:
        i, kind = k.split(".")[1], k.rsplit(".", 1)[1]
        for n, t in zip(_QKV, sd.pop(k).chunk(3)):
            sd["encoder.layer.%s.attention.attention.%s.%s" % (i, n, kind)] = t.contiguous()
    out = rename(sd, _HF, to_timm=False)
    return {("vit." + k if with_prefix and not k.startswith("classifier.") else k): v for k, v in out.items()}


DECODE = {
    "timm": lambda sd: _strip(sd, "module."),
    "vit-accel": lambda sd: sd,
    "mmcls": mmcls_to_timm,
    "hf": hf_to_timm,
}


def detect(keys) -> Optional[str]:
    """'hf', 'mmcls' or 'timm' from tensor names; None when none fits."""
    keys = list(keys)
    hf_block = re.compile(r"(vit\.)?(encoder\.layer|layers)\.\d+\.attention\.")
    if any("embeddings.patch_embeddings." in k or hf_block.match(k) for k in keys):
        return "hf"
    if any("patch_embed.projection." in k or re.match(r"(backbone\.)?layers\.\d+\.(ln1|ffn)\.", k) for k in keys):
        return "mmcls"
    if any(k.endswith("patch_embed.proj.weight") or re.match(r"(module\.)?blocks\.\d+\.", k) for k in keys):
        return "timm"
    return None
