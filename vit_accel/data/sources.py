"""From a recipe's data section (a DataConfig) to shard specs and loaders.

The one place that knows ``data.source``: ``shards`` names ``data.train_shards`` /
``data.val_shards``; ``digits`` writes the bundled digits on first use and names their manifests.
Python 3.8 / torch 2.0 compatible.
"""
from __future__ import annotations

from typing import Any, Tuple

from .eval_loader import EvalLoader
from .loader import TrainLoader
from .reader import DataError, ShardList
from .specs import check_local_shards, resolve_shards
from .transforms import eval_resize_size

SOURCES = ("shards", "digits")


def shard_specs(cfg: Any) -> Tuple[str, str]:
    """(train, val) shard specs; either is "" when source 'shards' leaves it unset."""
    source = getattr(cfg, "source", "shards")
    if source == "digits":
        from .digits import ensure_digits

        train, val, _ = ensure_digits(getattr(cfg, "root", "data"))
        return train, val
    if source != "shards":
        raise DataError("data.source must be one of %s, got %r" % (" or ".join(repr(s) for s in SOURCES), source))
    return getattr(cfg, "train_shards", ""), getattr(cfg, "val_shards", "")


def shard_spec(cfg: Any, split: str) -> str:
    """The shard spec of one split ('train' or 'val'); DataError when it is unset."""
    spec = shard_specs(cfg)[0 if split == "train" else 1]
    if not spec:
        raise DataError("data.%s_shards is empty: set it (--set data.%s_shards=...) to a manifest .json, a folder, "
                        "a brace pattern or a URL of shards (see vit-accel make-shards), or use data.source=digits"
                        % (split, split))
    return spec


def _shards_for(cfg: Any, split: str) -> ShardList:
    shards = resolve_shards(shard_spec(cfg, split))
    check_local_shards(shards)
    return shards


def build_train_loader(cfg: Any, img_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                       return_keys: bool = False, pin_memory: bool = False, log=None) -> TrainLoader:
    """The training loader of a recipe's data section (a DataConfig): batch_size is per rank."""
    return TrainLoader(_shards_for(cfg, "train"), img_size, batch_size, seed, rank=rank, world_size=world_size,
                       workers=cfg.workers, shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
                       scale=cfg.scale, ratio=cfg.ratio, interpolation=cfg.interpolation, hflip=cfg.hflip,
                       decoder=cfg.decoder, max_bad_fraction=cfg.max_bad_fraction, return_keys=return_keys,
                       pin_memory=pin_memory, auto_augment=getattr(cfg, "auto_augment", ""),
                       rand_augment=getattr(cfg, "rand_augment", ""),
                       random_erasing=getattr(cfg, "random_erasing", 0.0), mean=cfg.mean, std=cfg.std,
                       decode=getattr(cfg, "decode", "cpu"),
                       streams=getattr(cfg, "streams", 0), log=log)


def build_eval_loader(cfg: Any, img_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                      return_keys: bool = False) -> EvalLoader:
    """The validation loader: each sample once across ranks, resize shorter side + center crop."""
    return EvalLoader(_shards_for(cfg, "val"), img_size, batch_size, rank=rank, world_size=world_size,
                      workers=cfg.workers, resize=eval_resize_size(img_size, cfg.eval_resize, getattr(cfg, "eval_crop_fraction", 0.0)),
                      interpolation=getattr(cfg, "eval_interpolation", "") or cfg.interpolation,
                      decoder=cfg.decoder, max_bad_fraction=cfg.max_bad_fraction, return_keys=return_keys)
