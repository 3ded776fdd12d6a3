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

from .. import lazy_names

# name -> the module defining it, imported on first use: most of them load torch, and config.py's
# recipe checks import .settings from here without it (`vit-accel configs` answers without torch).
_WHERE = {
    "BatchMix": "augment", "SampleAugment": "augment", "add_bench_data_parser": "bench", "ensure_digits": "digits",
    "EvalLoader": "eval_loader", "TrainLoader": "loader", "add_make_shards_parser": "make_shards",
    "DataError": "reader", "ResumeMismatch": "reader", "ShardList": "reader",
    "BAD_SAMPLE_GRACE": "samples", "BadSampleStats": "samples", "too_many_bad": "samples",
    "ShardError": "shards", "read_manifest": "shards", "verify_manifest": "shards", "write_shards": "shards",
    "resolve_shards": "specs", "build_eval_loader": "sources", "build_train_loader": "sources",
    "shard_spec": "sources", "shard_specs": "sources", "normalize": "transforms",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_names(__name__, _WHERE)
