"""A recipe's ``auto`` model values, from the data and the pretrained file, before anything is built.

* ``model.num_classes: auto``: the count of the training manifest's classes (``make-shards`` writes
  them). A pinned count must equal the manifest's; validation shards must name the same classes in
  the same order (a label is an index into that list).
* ``model.name: auto``: the variant, patch size, depth, resolution and position grid of
  ``model.pretrained`` (``model.img_size``, when set, resamples the grid); its head and pre-logits
  are not kept (a new head for the data's classes, as the ViT paper fine-tunes: appendix B.1.1).

The result is a concrete recipe (recipe.yaml and the checkpoints record it) plus the class names,
and the pretrained file already read, so it is read once. Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

import copy
from typing import Any, List, NamedTuple, Optional, Tuple

from ..config import AUTO, ConfigError, Recipe

# what a ViTConfig from a file and one from the variant table must share for the weights to mean the same
_ARCH = ("width", "depth", "num_heads", "mlp_ratio", "patch_size", "in_chans", "qkv_bias", "qk_scale",
         "hybrid_layers", "layer_norm_eps", "global_pool", "fc_norm", "gelu_approximate")


class Resolved(NamedTuple):
    recipe: Recipe
    class_names: List[str]       # [] when the data has no class list
    pretrained: Any              # checkpoints.Source of model.pretrained when it was read here, else None


def split_classes(data: Any, split: str) -> Optional[List[str]]:
    """The class list of a split's shards (their manifest), None without one (or without the split)."""
    from ..data import shard_specs
    from ..data import resolve_shards

    spec = shard_specs(data)[0 if split == "train" else 1]
    if not spec:
        return None
    classes = resolve_shards(spec).classes
    return list(classes) if classes else None


def _where(data: Any, split: str) -> str:
    if getattr(data, "source", "shards") == "digits":
        return "the digits (data.source digits)"
    return "data.%s_shards (%s)" % (split, getattr(data, split + "_shards"))


def _names(classes: List[str], limit: int = 8) -> str:
    return ", ".join(classes[:limit]) + (" (+%d more)" % (len(classes) - limit) if len(classes) > limit else "")


def resolve_classes(recipe: Recipe, need_train: bool = True, head: Optional[int] = None) -> List[str]:
    """Check ``model.num_classes`` against the manifests (resolving ``auto``); returns the class names.

    ``need_train``: training reads the training manifest; evaluation only the validation one.
    ``head``: the checkpoint's class count, what ``auto`` takes when the data has no class list.
    """
    m, data = recipe.model, recipe.data
    train = split_classes(data, "train") if need_train else None
    val = split_classes(data, "val")
    if train is not None and val is not None and train != val:
        raise ConfigError("%s names other classes than %s (%d: %s vs %d: %s): a label is an index into that list, so "
                          "both must be written together (vit-accel make-shards writes train.json and val.json from "
                          "one folder)" % (_where(data, "val"), _where(data, "train"), len(val), _names(val),
                                           len(train), _names(train)))
    classes = train if train is not None else val
    which = "train" if train is not None else "val"
    if m.num_classes == AUTO and classes is None and head:
        m.num_classes = head
    elif m.num_classes == AUTO:
        if classes is None:
            raise ConfigError("model.num_classes is auto (the data's classes), but %s carries no class list (a "
                              "manifest written by vit-accel make-shards has one): point it at the manifest .json, "
                              "or set model.num_classes=N" % _where(data, "train" if need_train else "val"))
        if len(classes) < 2:
            raise ConfigError("%s has %d class (%s): a classifier needs at least two"
                              % (_where(data, which), len(classes), _names(classes)))
        m.num_classes = len(classes)
    elif classes is not None and len(classes) != m.num_classes:
        raise ConfigError("model.num_classes is %d, but %s has %d classes (%s): set model.num_classes=auto to take "
                          "the data's, or use shards of %d classes"
                          % (m.num_classes, _where(data, which), len(classes), _names(classes), m.num_classes))
    return classes or []


def resolve_model(recipe: Recipe, src: Any = None) -> Any:
    """``model.name: auto``: fill the model section from ``model.pretrained`` (or ``src``, a file already
    read); returns its Source (or None)."""
    from ..checkpoints import config_from_source, read
    from ..model import VARIANT_OPTIONS, VARIANTS, vit_config

    m = recipe.model
    if m.name != AUTO:
        return None
    if src is None and not m.pretrained:
        raise ConfigError("model.name is auto (the pretrained file's variant), but model.pretrained is empty: "
                          "--set model.pretrained=FILE (timm, HF, npz, mmcls or vit-accel; see vit-accel inspect FILE)")
    src = src if src is not None else read(m.pretrained, m.pretrained_format)
    f = config_from_source(src)
    def kind(name: str) -> Tuple[Tuple[int, ...], bool]:  # a variant's stem and qkv-bias layout
        opts = VARIANT_OPTIONS.get(name, {})
        return tuple(opts.get("hybrid_layers", ())), opts.get("qkv_bias", True)

    rows = [n for n, v in VARIANTS.items() if (v[0], v[2], v[3]) == (f.width, f.num_heads, f.mlp_ratio) and
            kind(n) == (tuple(f.hybrid_layers), f.qkv_bias)]
    if not rows:
        raise ConfigError("%s: width %d, %d heads, MLP ratio %g is no variant of the table (%s); name "
                          "a variant with model.name" % (src.path, f.width, f.num_heads, f.mlp_ratio,
                                                         ", ".join(VARIANTS)))
    name = next((n for n in rows if VARIANTS[n][4] == f.patch_size), rows[0])
    m.name = name
    m.patch_size = f.patch_size if f.patch_size != VARIANTS[name][4] else 0
    m.depth = f.depth if f.depth != VARIANTS[name][1] else 0
    m.img_size = m.img_size or f.img_size
    m.representation_size = 0
    m.global_pool, m.fc_norm = f.global_pool, f.fc_norm
    m.layer_norm_eps, m.gelu_approximate = f.layer_norm_eps, f.gelu_approximate
    from ..config import vit_options

    built = vit_config(name, **vit_options(m))
    differ = [k for k in _ARCH if getattr(built, k) != getattr(f, k)]
    if differ:
        raise ConfigError("%s: variant %s cannot express its %s (%s); name a variant with model.name"
                          % (src.path, name, ", ".join(differ),
                             ", ".join("%s %r" % (k, getattr(f, k)) for k in differ)))
    return src


def resolve_recipe(recipe: Recipe, need_train: bool = True) -> Resolved:
    """A copy of ``recipe`` with every ``auto`` of its model section resolved (see the module doc)."""
    r = copy.deepcopy(recipe)
    names = resolve_classes(r, need_train)
    src = resolve_model(r)
    return Resolved(r, names, src)


def resolve_for_eval(recipe: Recipe, src: Any) -> Resolved:
    """Evaluation of a checkpoint already read (``src``): the recipe's model section resolved from it
    and the validation manifest, and the class names (the checkpoint's and the manifest's must agree)."""
    from ..checkpoints import config_from_source

    r = copy.deepcopy(recipe)
    r.model.pretrained = ""
    f = config_from_source(src)
    names = resolve_classes(r, need_train=False, head=f.num_classes)
    resolve_model(r, src)
    if names and f.class_names and list(f.class_names) != names:
        raise ConfigError("%s was trained on classes %s, %s lists %s: a label means another class to this model; "
                          "evaluate on shards written with its classes" % (src.path, _names(list(f.class_names)),
                                                                          _where(r.data, "val"), _names(names)))
    return Resolved(r, names or list(f.class_names), src)
