"""Input pipeline: webdataset shards in, uint8 batches out (normalized on the device).

    build_train_loader(cfg, img_size, batch_size, seed, rank, world_size) -> TrainLoader
    build_eval_loader(cfg, img_size, batch_size, rank, world_size)        -> EvalLoader
    normalize(images_uint8, mean, std, dtype), mixup_cutmix(...)          device-side ops
    ensure_digits(root)                                                   the embedded default data
    add_make_shards_parser / add_bench_data_parser                        CLI subcommands

`cfg` is the recipe's data section (vit_accel.config.DataConfig). Python 3.8 / torch 2.0.
"""
from __future__ import annotations

from .bench import add_bench_data_parser
from .digits import ensure_digits
from .loader import (BAD_SAMPLE_GRACE, BadSampleStats, EvalLoader, TrainLoader, build_eval_loader,
                     build_train_loader, too_many_bad)
from .reader import DataError, ResumeMismatch, ShardList, resolve_shards
from .shards import ShardError, add_make_shards_parser, read_manifest, verify_manifest, write_shards
from .transforms import mixup_cutmix, normalize

__all__ = [
    "BAD_SAMPLE_GRACE", "BadSampleStats", "DataError", "EvalLoader", "ResumeMismatch", "ShardError", "ShardList",
    "TrainLoader",
    "add_bench_data_parser", "add_make_shards_parser", "build_eval_loader", "build_train_loader",
    "ensure_digits", "mixup_cutmix", "normalize", "read_manifest", "resolve_shards", "too_many_bad",
    "verify_manifest", "write_shards",
]
