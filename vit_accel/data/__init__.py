"""Input pipeline: webdataset shards in, uint8 batches out (normalized on the device).

    build_train_loader(cfg, img_size, batch_size, seed, rank, world_size) -> TrainLoader
    build_eval_loader(cfg, img_size, batch_size, rank, world_size)        -> EvalLoader
    shard_specs(cfg) -> (train, val)                                      the shards a recipe names
    normalize(images_uint8, mean, std, dtype)                             device-side op
    SampleAugment(...), BatchMix(...)                                     augmentations (augment.py)
    ensure_digits(root)                                                   the embedded default data
    add_make_shards_parser / add_bench_data_parser                        CLI subcommands

`cfg` is the recipe's data section (vit_accel.config.DataConfig). Python 3.8 / torch 2.0.
"""
from __future__ import annotations

from .augment import BatchMix, SampleAugment
from .bench import add_bench_data_parser
from .digits import ensure_digits
from .eval_loader import EvalLoader
from .loader import TrainLoader
from .make_shards import add_make_shards_parser
from .reader import DataError, ResumeMismatch, ShardList
from .samples import BAD_SAMPLE_GRACE, BadSampleStats, too_many_bad
from .shards import ShardError, read_manifest, verify_manifest, write_shards
from .specs import resolve_shards
from .sources import build_eval_loader, build_train_loader, shard_spec, shard_specs
from .transforms import normalize

__all__ = [
    "BAD_SAMPLE_GRACE", "BadSampleStats", "BatchMix", "DataError", "EvalLoader", "ResumeMismatch", "SampleAugment",
    "ShardError", "ShardList", "TrainLoader",
    "add_bench_data_parser", "add_make_shards_parser", "build_eval_loader", "build_train_loader",
    "ensure_digits", "normalize", "read_manifest", "resolve_shards", "shard_spec", "shard_specs", "too_many_bad",
    "verify_manifest", "write_shards",
]
