"""Recipes: typed sections loaded from YAML, ``--set section.key=value`` overrides, validation.

A recipe is data with provenance (``configs/NAME.yaml``). Unknown keys and wrong types are
errors that name the key, the value and what was expected. The global batch is stated once
(``train.global_batch_size``); each backend's numbers must multiply to it.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from .errors import ConfigError  # noqa: F401  (defined beside the other user errors)


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------

AUTO = "auto"  # a model value taken from the data or the pretrained file (engine/resolve.py)


@dataclass
class ModelConfig:
    name: str = "vit-b16"                 # a row of vit_accel.model.VARIANTS, or "auto": model.pretrained's
    img_size: int = 224                   # 0 = model.pretrained's (with name auto)
    patch_size: int = 0                   # 0 = the variant's
    depth: int = 0                        # 0 = the variant's
    num_classes: Union[int, str] = "auto"  # "auto" = the training data's classes (its manifest); published rows pin it
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    representation_size: int = 0          # 0 = none (in-21k checkpoints have width)
    global_pool: str = "token"
    fc_norm: bool = False                 # LayerNorm after pooling (timm avg-pool / MAE fine-tunes)
    layer_norm_eps: float = 1e-6
    gelu_approximate: str = "none"
    pos_embed_std: float = 0.02           # position-embedding init scale (timm: 0.02)
    pretrained: str = ""                  # a file the user passes; nothing is downloaded
    pretrained_format: str = "auto"


def vit_options(m: ModelConfig) -> Dict[str, Any]:
    """The ``create_vit(m.name, **options)`` keywords of a model section (0 = the variant's).

    ``auto`` values must be resolved first (``vit_accel.engine.resolve``: from the data and the file).
    """
    if m.num_classes == AUTO or m.name == AUTO or not m.img_size:
        raise ConfigError(f"model.name {m.name!r}, img_size {m.img_size}, num_classes {m.num_classes!r}: 'auto' "
                          f"values come from the data's manifest and model.pretrained, which only train and eval "
                          f"read; pin them here (--set model.num_classes=N ...)")
    out: Dict[str, Any] = dict(img_size=m.img_size, num_classes=m.num_classes, drop_rate=m.drop_rate,
                               attn_drop_rate=m.attn_drop_rate, drop_path_rate=m.drop_path_rate,
                               global_pool=m.global_pool, fc_norm=m.fc_norm, layer_norm_eps=m.layer_norm_eps,
                               gelu_approximate=m.gelu_approximate, pos_embed_std=m.pos_embed_std)
    for key in ("patch_size", "depth", "representation_size"):
        if getattr(m, key):
            out[key] = getattr(m, key)
    return out


@dataclass
class DataConfig:
    source: str = "shards"                # "shards" or "digits" (bundled, written on first use)
    root: str = "data"
    train_shards: str = ""
    val_shards: str = ""
    mean: List[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    std: List[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    interpolation: str = "bilinear"
    hflip: float = 0.5
    eval_resize: int = 0
    eval_crop_fraction: float = 0.0       # timm's crop_pct: shorter side to floor(img_size / fraction), 0 = eval_resize
    eval_interpolation: str = ""          # "" = data.interpolation
    workers: int = 4
    shuffle_buffer: int = 1000            # raw records per stream (the run holds streams x this many)
    streams: int = 0                      # the epoch's order: this many sample streams (0 = auto; see data/loader.py)
    resampled: bool = False
    max_bad_fraction: float = 0.001
    mixup: float = 0.0                    # Beta alpha of mixup (0 = off)
    cutmix: float = 0.0                   # Beta alpha of cutmix (0 = off)
    decoder: str = "auto"                 # auto: the first of libjpeg, torchvision, simplejpeg, pil that works
    decode: str = "cpu"                   # "cpu" (loader workers) or "gpu" (JPEG bytes to the device, nvJPEG)
    auto_augment: str = ""                # "" or "imagenet" (ClassyVision's policy via torchvision)
    rand_augment: str = ""                # "" or a timm RandAugment string, e.g. "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.0           # probability of mmpretrain's RandomErasing (mode 'rand')
    mix_prob: float = 1.0                 # probability that a batch is mixed (mixup or cutmix)
    mix_switch_prob: float = 0.5          # probability of cutmix rather than mixup when both alphas > 0


@dataclass
class OptimConfig:
    name: str = "sgd"                     # "sgd" or "adamw"
    lr: float = 0.08
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-5
    no_decay: List[str] = field(default_factory=lambda: ["cls_token", "pos_embed"])
    no_decay_1d: bool = False             # also exempt biases and norm weights (timm style)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    label_smoothing: float = 0.0
    clip_grad_norm: float = 0.0           # 0 = no clipping
    loss: str = "ce"                      # the source's name, "ce" or "soft_ce": one function (engine/loss.py)
    layer_decay: float = 0.0              # layer-wise lr decay: lr x decay^(depth + 1 - layer) (0 or 1 = off)


@dataclass
class ScheduleConfig:
    total_steps: int = 5000
    warmup_steps: int = 800
    warmup_start_factor: float = 0.02     # lr at step 0 = factor x lr
    kind: str = "cosine"                  # a name of SCHEDULES (each source's own formula, engine/schedule.py)
    min_lr: float = 0.0
    epochs: float = 0.0                   # run length in epochs instead of total_steps (0 = use total_steps)
    warmup_epochs: float = 0.0            # warm-up in epochs instead of warmup_steps
    warmup_fraction: float = 0.0          # warm-up as a fraction of the run (ClassyVision's composite lengths)


@dataclass
class TrainConfig:
    global_batch_size: int = 2176
    seed: int = 42
    log_every: int = 100
    eval_every: int = 1000                # 0 = only at the end
    checkpoint_every: int = 1000          # 0 = only at the end
    keep_checkpoints: int = 2
    eval_batch_size: int = 0              # 0 = the micro-batch size
    ema_momentum: float = 0.0             # model EMA, mmengine's momentum: ema = (1 - m) ema + m w (0 = off)
    max_skipped_steps: int = 50           # fp16: this many optimizer steps skipped in a row stop the run
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # checkpoint, then exit 75
    async_checkpoint: bool = False        # snapshot in host memory, write in a background thread


@dataclass
class DistributedConfig:
    zero_stage: int = -1                  # -1 = plain data parallel without DeepSpeed; 0..3 = DeepSpeed ZeRO
    offload_optimizer: bool = False
    dist_backend: str = "auto"            # "auto" (nccl on GPUs, gloo on CPU), "nccl", "gloo"


@dataclass
class CPUConfig:
    micro_batch_size: int = 64
    gradient_accumulation: int = 0        # 0 = derived from global batch / (micro x world)
    precision: str = "auto"               # "auto" (bf16 where the CPU computes it natively), "fp32" or "bf16" (autocast)
    compile: str = "auto"                 # "auto" (when the run repays the compile), "true" or "false": torch.compile
    threads: int = 0                      # 0 = torch's default


@dataclass
class GPUConfig:
    micro_batch_size: int = 136
    gradient_accumulation: int = 0        # 0 = derived from global batch / (micro x world)
    precision: str = "bf16"               # "bf16", "fp16" (dynamic loss scaling) or "fp32"
    attn_impl: str = "triton"             # "triton", "sdpa" or "eager"
    norm_impl: str = "triton"
    mlp_impl: str = "triton"
    compile: bool = False


@dataclass
class IPUConfig:
    micro_batch_size: int = 17
    gradient_accumulation: int = 32
    replicas: int = 4
    device_iterations: int = 1
    ipus_per_replica: int = 4
    splits: List[str] = field(default_factory=lambda: ["patch_embed", "blocks.3", "blocks.6", "blocks.9"])
    layers_per_ipu: List[int] = field(default_factory=list)   # alternative to splits
    auto_split: bool = False              # balance estimated memory/FLOPs instead
    recompute: str = "every_block"        # "every_block" or "none"
    available_memory_proportion: float = 0.3
    partials_type: str = "half"
    stochastic_rounding: bool = True
    half: bool = True                     # model and inputs in fp16
    loss_scaling: float = 256.0
    accum_type: str = "half"
    velocity_accum_type: str = "half"
    reduction: str = "mean"
    output_mode: str = "final"
    optimizer_location: str = "on_chip"   # "on_chip" or "off_chip"
    replicated_tensor_sharding: bool = False
    executable_cache: str = ""
    loader_mode: str = "async_rebatched"
    buffer_size: int = 8


@dataclass
class PipelineConfig:
    stages: List[str] = field(default_factory=list)  # stage starts for torch.distributed.pipelining
    schedule: str = "gpipe"               # "gpipe" or "1f1b"
    micro_batches: int = 4


@dataclass
class ReproducesConfig:
    """The published row a recipe reproduces (machine-readable provenance; empty = none)."""
    source: str = ""                      # "mmcls", "mmpretrain", "timm", "classyvision" ("" = not a published row)
    name: str = ""                        # the source's own name: config file or model name
    resolution: int = 0
    top1: Optional[float] = None          # published ImageNet-1k validation top-1 / top-5 (%)
    top5: Optional[float] = None
    params_m: Optional[float] = None      # published parameters, millions
    flops_g: Optional[float] = None       # published FLOPs (G) as the source counts them
    params_resolution: int = 0            # resolution the published params/FLOPs belong to (0 = resolution)
    notes: str = ""
    evaluation: bool = False              # an evaluation row (converted weights): `train` refuses the recipe


REPRODUCES_SOURCES = ("", "mmcls", "mmpretrain", "timm", "classyvision")


def check_trainable(r: "Recipe") -> None:
    """Refuse, in one line, to train a recipe that reproduces an evaluation row."""
    rp = r.reproduces
    if rp.evaluation:
        top1 = f", top-1 {rp.top1}" if rp.top1 else ""
        raise ConfigError(f"{r.name} is an evaluation row: it reproduces the evaluation of converted weights "
                          f"({rp.source} {rp.name}, {rp.resolution} px{top1}), not their training; evaluate with "
                          f"`vit-accel eval --config {r.name} --checkpoint FILE`, or train with a training recipe "
                          f"(`vit-accel configs` lists them)")


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    reproduces: ReproducesConfig = field(default_factory=ReproducesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    cpu: CPUConfig = field(default_factory=CPUConfig)
    gpu: GPUConfig = field(default_factory=GPUConfig)
    ipu: IPUConfig = field(default_factory=IPUConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "description", "reproduces")]


# ---------------------------------------------------------------------------------------
# Typed construction
# ---------------------------------------------------------------------------------------

def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) ``value`` against the annotation ``tp``; errors name the key."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X], or one of several types (the first that takes the value)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for a in args:
            try:
                return _coerce(path, value, a)
            except ConfigError:
                pass
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{path}: expected {names}, got {value!r} ({type(value).__name__})")
    if origin in (list, List):
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
        raise ConfigError(f"{path}: expected a list of {getattr(item, '__name__', item)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML's true/false for a switch that also takes "auto"
            return "true" if value else "false"
    else:
        return value
    raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown key {where + '.' if where else ''}{unknown[0]}; valid keys"
                          f"{' in ' + where if where else ''}: {', '.join(names)}")
    kwargs = {}
    for k, v in data.items():
        path = f"{where}.{k}" if where else k
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(hints[k], v or {}, path)
        else:
            kwargs[k] = _coerce(path, v, hints[k])
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (``0.1``, ``true``, ``[3,3,3,3]``, ``vit-b16``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: Dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` to the raw recipe dict (validated later by ``_build``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"--set key must be section.key (sections: {', '.join(SECTIONS)}), got {key!r}")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r} in --set {assignment!r}; valid: {', '.join(SECTIONS)}")
    value = parse_value(text)
    hints = typing.get_type_hints(type(getattr(Recipe(), section)))
    if hints.get(name) is str and not isinstance(value, str):
        value = text  # '--set model.pretrained=123' is still a string
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][name] = value


# ---------------------------------------------------------------------------------------
# Finding and loading recipes
# ---------------------------------------------------------------------------------------

def config_dirs() -> List[Path]:
    """Where ``--config NAME`` looks: $VIT_ACCEL_CONFIGS, ./configs, the package's configs/."""
    dirs = []
    if os.environ.get("VIT_ACCEL_CONFIGS"):
        dirs.append(Path(os.environ["VIT_ACCEL_CONFIGS"]))
    dirs.append(Path.cwd() / "configs")
    dirs.append(Path(__file__).resolve().parent.parent / "configs")   # a source checkout
    dirs.append(Path(__file__).resolve().parent / "configs")          # an installed wheel
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def find_config(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    for d in config_dirs():
        cand = d / f"{name}.yaml"
        if cand.exists():
            return cand
    known = ", ".join(sorted(list_configs())) or "none found"
    raise ConfigError(f"no recipe named {name!r} (looked in {', '.join(str(d) for d in config_dirs())}); "
                      f"known recipes: {known}")


def list_configs() -> Dict[str, str]:
    """Recipe name -> one-line description."""
    out: Dict[str, str] = {}
    for d in config_dirs():
        for p in sorted(d.glob("*.yaml")):
            if p.stem not in out:
                try:
                    out[p.stem] = (yaml.safe_load(p.read_text()) or {}).get("description", "")
                except yaml.YAMLError:
                    out[p.stem] = "(unreadable YAML)"
    return out


def load_recipe(name: str, overrides: Optional[List[str]] = None, backends: Optional[List[str]] = None) -> Recipe:
    """Load ``configs/NAME.yaml`` (or a path), apply ``--set`` overrides, validate.

    ``backends``: whose batch arithmetic must reach the global batch (default: every section;
    the CLI passes the backend it runs, so ``--set train.global_batch_size=...`` for a CPU run
    does not also demand a new IPU layout).
    """
    path = find_config(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    raw.setdefault("name", path.stem)
    for a in overrides or []:
        apply_override(raw, a)
    recipe = _build(Recipe, raw, "")
    if recipe.model.num_classes == AUTO and recipe.data.source == "digits":
        from .data.digits import CLASSES  # a fixed dataset: its count is known without reading it

        recipe.model.num_classes = len(CLASSES)
    validate(recipe, backends)
    return recipe


# ---------------------------------------------------------------------------------------
# Validation and batch arithmetic
# ---------------------------------------------------------------------------------------

def _one_of(path: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")


def batch_split(global_batch: int, micro_batch: int, world_size: int, requested: int = 0,
                section: str = "cpu") -> Tuple[int, int]:
    """(micro-batch, accumulation) with micro x accumulation x world size = global batch.

    ``micro_batch`` is an upper bound (what fits on a device): the micro-batch shrinks to the
    largest size that divides each process's share and accumulation makes up the rest, so the
    global batch is reached on any world size that divides it (ClassyVision's
    ``simulated_global_batchsize``). ``requested`` fixes the accumulation instead.
    """
    if global_batch % world_size:
        raise ConfigError(
            f"batch arithmetic: train.global_batch_size {global_batch} is not divisible by the world size "
            f"{world_size} (processes); change train.global_batch_size or the number of processes "
            f"(--nproc_per_node x nodes)")
    share = global_batch // world_size
    if requested:
        if share % requested or share // requested > micro_batch:
            raise ConfigError(
                f"batch arithmetic: train.global_batch_size {global_batch} / world size {world_size} = {share} "
                f"per process, which {section}.gradient_accumulation {requested} "
                + ("does not divide" if share % requested else
                   f"splits into micro-batches of {share // requested} > {section}.micro_batch_size {micro_batch}")
                + f"; set {section}.gradient_accumulation=0 to derive it")
        return share // requested, requested
    micro = max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)
    return micro, share // micro


# schedule.kind -> what it computes (engine/schedule.py, each as its source does)
SCHEDULES: Dict[str, str] = {
    "cosine": "linear warm-up, then cosine from lr to min_lr over the steps after warm-up",
    "constant": "linear warm-up, then constant lr",
    "mmcv_cosine": "mmcv 1.x CosineAnnealing by iteration, linear warm-up multiplying it (warmup_ratio)",
    "mmengine_linear_cosine": "mmengine LinearLR per iteration over warmup_epochs, then CosineAnnealingLR per epoch",
    "classy_composite": "ClassyVision composite: linear (rescaled) for warmup_fraction, then cosine (fixed)",
    "classy_cosine": "ClassyVision cosine over the whole run, per step",
}


# ---------------------------------------------------------------------------------------
# Static checks of the schedule section (engine/schedule.py computes the rates)
# ---------------------------------------------------------------------------------------

def is_whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-9


def check_schedule(cfg: ScheduleConfig) -> None:
    """Static checks of a schedule section; errors name the keys and the valid values."""
    if cfg.kind not in SCHEDULES:
        raise ConfigError(f"schedule.kind: {cfg.kind!r} is not one of {', '.join(SCHEDULES)}")
    for key in ("total_steps", "warmup_steps", "epochs", "warmup_epochs", "warmup_fraction", "min_lr"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"schedule.{key} must be >= 0, got {getattr(cfg, key)}")
    if (cfg.total_steps > 0) == (cfg.epochs > 0):
        raise ConfigError(f"schedule: give the run's length once, total_steps (optimizer steps) or epochs; got "
                          f"total_steps {cfg.total_steps} and epochs {cfg.epochs} (set the other one to 0)")
    warm = [k for k in ("warmup_steps", "warmup_epochs", "warmup_fraction") if getattr(cfg, k) > 0]
    if len(warm) > 1:
        raise ConfigError(f"schedule: give the warm-up once; got {' and '.join(f'{k} {getattr(cfg, k)}' for k in warm)}"
                          f" (set the others to 0)")
    if cfg.warmup_fraction >= 1:
        raise ConfigError(f"schedule.warmup_fraction {cfg.warmup_fraction} must be below 1 (a fraction of the run)")
    if not 0 <= cfg.warmup_start_factor <= 1:
        raise ConfigError(f"schedule.warmup_start_factor {cfg.warmup_start_factor} must be in [0, 1]")
    if cfg.kind == "mmengine_linear_cosine":
        if not (cfg.epochs > 0 and is_whole(cfg.epochs) and cfg.warmup_epochs > 0 and is_whole(cfg.warmup_epochs)):
            raise ConfigError(f"schedule.kind mmengine_linear_cosine counts whole epochs (its cosine steps once per "
                              f"epoch): set schedule.epochs and schedule.warmup_epochs to whole numbers, got epochs "
                              f"{cfg.epochs}, warmup_epochs {cfg.warmup_epochs} (total_steps and warmup_steps 0)")
    if cfg.kind == "classy_composite" and not cfg.warmup_fraction > 0:
        raise ConfigError("schedule.kind classy_composite needs schedule.warmup_fraction (its lengths[0], e.g. 0.1) "
                          "and warmup_steps 0")
    if cfg.kind == "classy_cosine" and warm:
        raise ConfigError(f"schedule.kind classy_cosine has no warm-up; set {warm[0]} to 0 (or use classy_composite)")
    if cfg.total_steps and cfg.warmup_steps and cfg.warmup_steps >= cfg.total_steps:
        raise ConfigError(f"schedule: warmup_steps {cfg.warmup_steps} >= total_steps {cfg.total_steps}: the warm-up "
                          f"must end before the run does")


def _check_auto_model(m: ModelConfig) -> None:
    if isinstance(m.num_classes, str) and m.num_classes != AUTO:
        raise ConfigError(f"model.num_classes: expected a number of classes or 'auto' (the data's), "
                          f"got {m.num_classes!r}")
    if isinstance(m.num_classes, int) and m.num_classes < 0:
        raise ConfigError(f"model.num_classes must be >= 0 (0 = no head) or 'auto', got {m.num_classes}")
    if m.img_size < 0 or (m.img_size == 0 and m.name != AUTO):
        raise ConfigError(f"model.img_size {m.img_size}: 0 (the pretrained file's) needs model.name auto; "
                          f"otherwise give the image size")
    if m.name == AUTO:
        pinned = [k for k in ("patch_size", "depth", "representation_size") if getattr(m, k)]
        if pinned:
            raise ConfigError(f"model.name auto takes the architecture from model.pretrained; model.{pinned[0]} "
                              f"{getattr(m, pinned[0])} would contradict it (set it to 0, or name the variant)")


_NEVER_CAUGHT = ("SIGKILL", "SIGSTOP")


def check_stop_signals(names: List[str]) -> None:
    """ConfigError for a name that is not a signal this process can catch."""
    for name in names:
        if name in _NEVER_CAUGHT or not name.startswith("SIG") or not isinstance(getattr(signal, name, None),
                                                                                 signal.Signals):
            raise ConfigError("train.stop_signals: %r is not a signal a process can catch; use names such as "
                              "SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP ([] turns this off)" % name)


def validate(r: Recipe, backends: Optional[List[str]] = None) -> None:
    from .variants import VARIANTS

    _one_of("model.name", r.model.name, list(VARIANTS) + [AUTO])
    _check_auto_model(r.model)
    _one_of("model.global_pool", r.model.global_pool, ("token", "avg"))
    _one_of("reproduces.source", r.reproduces.source, REPRODUCES_SOURCES)
    _one_of("data.source", r.data.source, ("shards", "digits"))
    _one_of("data.interpolation", r.data.interpolation, ("bilinear", "bicubic"))
    _one_of("data.eval_interpolation", r.data.eval_interpolation, ("", "bilinear", "bicubic"))
    if not 0.0 <= r.data.eval_crop_fraction <= 1.0:
        raise ConfigError(f"data.eval_crop_fraction: {r.data.eval_crop_fraction} is outside (0, 1] "
                          "(0 = use data.eval_resize)")
    if r.data.eval_crop_fraction and r.data.eval_resize:
        raise ConfigError(f"data.eval_crop_fraction {r.data.eval_crop_fraction} and data.eval_resize "
                          f"{r.data.eval_resize} both set the resize before the center crop; keep one")
    _one_of("optim.name", r.optim.name, ("sgd", "adamw"))
    _one_of("optim.loss", r.optim.loss, ("ce", "soft_ce"))
    from .data.settings import check_augment_settings

    try:
        check_augment_settings(r.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _one_of("cpu.precision", r.cpu.precision, ("auto", "fp32", "bf16"))
    _one_of("cpu.compile", r.cpu.compile, ("auto", "true", "false"))
    _one_of("gpu.precision", r.gpu.precision, ("bf16", "fp16", "fp32"))
    for k in ("attn_impl",):
        _one_of(f"gpu.{k}", getattr(r.gpu, k), ("triton", "sdpa", "eager"))
    for k in ("norm_impl", "mlp_impl"):
        _one_of(f"gpu.{k}", getattr(r.gpu, k), ("triton", "torch"))
    _one_of("distributed.zero_stage", r.distributed.zero_stage, (-1, 0, 1, 2, 3))
    _one_of("pipeline.schedule", r.pipeline.schedule, ("gpipe", "1f1b"))
    if len(r.data.mean) != 3 or len(r.data.std) != 3:
        raise ConfigError("data.mean and data.std need 3 values (RGB)")
    check_schedule(r.schedule)
    check_stop_signals(r.train.stop_signals)
    g = r.train.global_batch_size
    if g <= 0:
        raise ConfigError("train.global_batch_size must be positive")
    # The global batch is stated once; each backend's numbers must reach it.
    backends = list(backends) if backends else ["cpu", "gpu", "ipu"]
    ipu = r.ipu
    if "ipu" in backends and ipu.micro_batch_size * ipu.gradient_accumulation * ipu.replicas != g:
        raise ConfigError(
            f"batch arithmetic (ipu): micro_batch_size {ipu.micro_batch_size} x gradient_accumulation "
            f"{ipu.gradient_accumulation} x replicas {ipu.replicas} = "
            f"{ipu.micro_batch_size * ipu.gradient_accumulation * ipu.replicas}, but train.global_batch_size "
            f"is {g}")
    for name in [b for b in ("cpu", "gpu") if b in backends]:
        sec = getattr(r, name)
        if sec.micro_batch_size <= 0 or sec.gradient_accumulation < 0:
            raise ConfigError(f"batch arithmetic ({name}): {name}.micro_batch_size must be positive and "
                              f"{name}.gradient_accumulation >= 0 (0 = derived)")
        if sec.gradient_accumulation and g % sec.gradient_accumulation:
            raise ConfigError(
                f"batch arithmetic ({name}): {name}.gradient_accumulation {sec.gradient_accumulation} does not "
                f"divide train.global_batch_size {g}")
