"""Class names where each checkpoint format keeps them, read as hints and written beside the weights.

* ours (``vit-accel`` safetensors, training checkpoints, npz, mmcls meta, HF ``vit_accel_config``):
  ``class_names`` inside the model config (``ViTConfig.class_names``);
* HF transformers: ``id2label`` / ``label2id`` in config.json (``LABEL_0``... are HF's placeholders
  for "no names", read as none);
* MMClassification 0.x: ``meta["CLASSES"]``; mmpretrain 1.x: ``meta["dataset_meta"]["classes"]``;
* timm: ``label_names`` in a pretrained config (``timm_dir.py``).

Names are only hints: a list that is not strings, or of the wrong length, is ignored.
Python 3.8 / torch 2.0 compatible (the IPU path imports it).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

_HF_PLACEHOLDER = re.compile(r"^LABEL_(\d+)$")


def as_names(value: Any) -> Optional[List[str]]:
    """A list of class names from a list/tuple of strings or an ``{index: name}`` dict; None otherwise."""
    if isinstance(value, dict):
        try:
            by_index = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            return None
        if sorted(by_index) != list(range(len(by_index))):
            return None
        value = [by_index[i] for i in range(len(by_index))]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def hf_names(config: Dict[str, Any]) -> Optional[List[str]]:
    """The names in an HF config.json's ``id2label``; None for HF's ``LABEL_i`` placeholders."""
    names = as_names(config.get("id2label"))
    if names is None or all(_HF_PLACEHOLDER.match(n) and int(n[6:]) == i for i, n in enumerate(names)):
        return None
    return names


def hf_label_maps(names: Sequence[str], num_classes: int) -> Dict[str, Dict[str, Any]]:
    """``id2label`` / ``label2id`` for config.json: the names, or HF's placeholders without them."""
    labels = list(names) if names else ["LABEL_%d" % i for i in range(num_classes)]
    return {"id2label": {str(i): n for i, n in enumerate(labels)},
            "label2id": {n: i for i, n in enumerate(labels)}}


def mmcls_meta(names: Sequence[str]) -> Dict[str, Any]:
    """Where MMClassification 0.x (``CLASSES``) and mmpretrain 1.x (``dataset_meta``) keep the names."""
    return {"CLASSES": list(names), "dataset_meta": {"classes": list(names)}} if names else {}


def payload_hints(obj: Any) -> Dict[str, Any]:
    """Hints of a torch checkpoint's non-tensor part: names (mmcls/mmpretrain meta) and, for a
    vit-accel training checkpoint, its recipe (the evaluation preprocessing ``predict`` uses)."""
    if not isinstance(obj, dict):
        return {}
    hints: Dict[str, Any] = {}
    if obj.get("format") == "vit-accel-train" and isinstance(obj.get("recipe"), dict):
        hints["recipe"] = obj["recipe"]
    meta = obj.get("meta")
    if isinstance(meta, dict):
        dataset_meta = meta.get("dataset_meta")
        names = as_names(meta.get("CLASSES")) or (as_names(dataset_meta.get("classes"))
                                                  if isinstance(dataset_meta, dict) else None)
        if names:
            hints["class_names"] = names
    return hints
