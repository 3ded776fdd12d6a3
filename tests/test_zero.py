"""DeepSpeed ZeRO on CPU processes (gloo): config translation, and real 2-process training.

The multi-process tests launch torchrun with a timeout (nothing hangs CI). They need deepspeed;
the first run JIT-compiles a small extension into build/torch_extensions (~30 s, once).
Tolerances: fp32 ZeRO 1/2/3 and DDP differ only by reduction order (observed < 1e-6 on the loss),
so curves must agree to 1e-4; bf16 weights (fp32 masters) stay within 3e-2 of the fp32 curve.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_accel.config import ConfigError, Recipe
from vit_accel.model import create_vit
from digit_tars import write_digit_tars
from testkit import free_port, made_once

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

deepspeed_missing = False
try:
    import importlib.util

    deepspeed_missing = importlib.util.find_spec("deepspeed") is None
except Exception:  # pragma: no cover
    deepspeed_missing = True
needs_deepspeed = pytest.mark.skipif(deepspeed_missing, reason="deepspeed is not installed")

FP32_TOL = 1e-4
BF16_TOL = 3e-2


# ---------------------------------------------------------------------------------------
# Recipe -> DeepSpeed config (no processes)
# ---------------------------------------------------------------------------------------

def _recipe(stage=2, global_batch=64, clip=0.0, offload=False) -> Recipe:
    r = Recipe()
    r.train.global_batch_size = global_batch
    r.distributed.zero_stage = stage
    r.distributed.offload_optimizer = offload
    r.optim.clip_grad_norm = clip
    return r


def test_config_batch_arithmetic():
    from vit_accel.backends.zero import deepspeed_config

    cfg = deepspeed_config(_recipe(global_batch=2176), world_size=8, micro_batch_size=136, precision="bf16")
    assert cfg["train_batch_size"] == 2176
    assert cfg["train_micro_batch_size_per_gpu"] == 136
    assert cfg["gradient_accumulation_steps"] == 2            # 136 x 2 x 8 = 2176
    assert cfg["train_batch_size"] == (cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 8)
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["gradient_clipping"] == 0.0
    assert cfg["steps_per_print"] > 10 ** 6 and cfg["wall_clock_breakdown"] is False
    assert "optimizer" not in cfg and "scheduler" not in cfg   # our optimizer and schedule go in unchanged


def test_config_requested_accumulation_must_reach_global_batch():
    from vit_accel.backends.zero import deepspeed_config

    assert deepspeed_config(_recipe(global_batch=64), 2, 8, "fp32", gradient_accumulation_steps=4)[
        "gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match=r"32 per process, which cpu.gradient_accumulation 3 does not divide"):
        deepspeed_config(_recipe(global_batch=64), 2, 8, "fp32", gradient_accumulation_steps=3)


def test_config_world_size_that_does_not_divide_is_a_clear_error():
    from vit_accel.backends.zero import deepspeed_config

    with pytest.raises(ConfigError, match=r"global_batch_size 64 is not divisible by the world size 3 .*"
                                          r"change train.global_batch_size or the number of processes"):
        deepspeed_config(_recipe(global_batch=64), world_size=3, micro_batch_size=8, precision="fp32")
    # any world size that divides the global batch works: the micro-batch shrinks, accumulation fills
    cfg = deepspeed_config(_recipe(global_batch=64), world_size=2, micro_batch_size=64, precision="fp32")
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (32, 1)


def test_config_precision_clipping_offload():
    from vit_accel.backends.zero import deepspeed_config

    fp16 = deepspeed_config(_recipe(stage=3, clip=1.0, offload=True), 4, 16, "fp16")
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0   # dynamic loss scaling
    assert "bf16" not in fp16
    assert fp16["gradient_clipping"] == 1.0
    assert fp16["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert fp16["zero_force_ds_cpu_optimizer"] is False     # keep our torch optimizer when offloading
    fp32 = deepspeed_config(_recipe(stage=1), 4, 16, "fp32")
    assert "bf16" not in fp32 and "fp16" not in fp32


def test_config_errors_name_the_fix():
    from vit_accel.backends.zero import deepspeed_config

    with pytest.raises(ConfigError, match="offload_optimizer needs ZeRO stage 1, 2 or 3"):
        deepspeed_config(_recipe(stage=0, offload=True), 1, 64, "fp32")
    with pytest.raises(ConfigError, match="-1 means plain data parallel"):
        deepspeed_config(_recipe(stage=-1), 1, 64, "fp32")
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        deepspeed_config(_recipe(), 1, 64, "fp8")


@needs_deepspeed
def test_config_is_accepted_by_deepspeed():
    """DeepSpeed's own config parser agrees with our batch arithmetic.

    Without a process group DeepSpeedConfig assumes one process, so the config is for world size 1.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    from vit_accel.backends.zero import deepspeed_config

    cfg = deepspeed_config(_recipe(stage=3, global_batch=2176, clip=1.0, offload=True), 1, 136, "bf16")
    ds = DeepSpeedConfig(cfg)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (2176, 136, 16)
    assert ds.zero_optimization_stage == 3 and ds.bfloat16_config.enabled and ds.gradient_clipping == 1.0


# ---------------------------------------------------------------------------------------
# Two CPU processes under torchrun
# ---------------------------------------------------------------------------------------

def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.pop("DS_ACCELERATOR", None)  # the CPU backend itself must choose DeepSpeed's CPU accelerator
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions")))
    return env


def _run(cmd, cwd, timeout):
    try:
        p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{(e.stdout or '')[-3000:]}")
    if p.returncode != 0:
        pytest.fail(f"exit {p.returncode}: {' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *map(str, args)]


RUNS = ["-1:fp32", "0:fp32", "1:fp32", "2:fp32", "3:fp32", "3:bf16"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One torchrun launch of tests/zero_worker.py: DDP and ZeRO 0..3 on the same data, then ZeRO-3
    validation over shards split unevenly."""
    if deepspeed_missing:
        pytest.skip("deepspeed is not installed")

    def launch(out):
        # 3 validation shards over 2 ranks: rank 0 reads shards 0 and 2 (150 samples, 10 batches of 16),
        # rank 1 shard 1 (30 samples, 2 batches)
        val = write_digit_tars(out / "val", "val", [50, 30, 100])
        _run(_torchrun(ROOT / "tests" / "zero_worker.py", "--out", out, "--steps", "4", f"--runs={','.join(RUNS)}",
                       "--val", val), cwd=out, timeout=420)
        return str(out)

    out = Path(made_once(tmp_path_factory, "zero_worker", launch))
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_zero_stages_match_plain_data_parallel(worker):
    _, res = worker
    ref = res["-1:fp32"]["losses"]
    # the updates move the loss far more than the tolerance, so matching curves means matching updates
    assert len(ref) == 4 and max(abs(x - ref[0]) for x in ref) > 100 * FP32_TOL
    for stage in (0, 1, 2, 3):
        r = res[f"{stage}:fp32"]
        assert r["zero_stage"] == stage and r["grad_accum"] == 2
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref))
        assert diff < FP32_TOL, f"ZeRO-{stage} loss curve {r['losses']} vs DDP {ref}: max diff {diff}"
    bf16 = res["3:bf16"]["losses"]
    assert max(abs(a - b) for a, b in zip(bf16, ref)) < BF16_TOL, (bf16, ref)


@pytest.mark.slow
def test_zero_resume_replays_the_same_steps(worker):
    _, res = worker
    for spec in ("0:fp32", "1:fp32", "2:fp32", "3:fp32", "3:bf16"):
        r = res[spec]
        assert r["resumed_extra"] == {"step": 2, "marker": spec}
        assert r["checkpoint"].endswith("step_0000002.pt")
        tol = 1e-6 if spec.endswith("fp32") else 1e-3
        diff = max(abs(a - b) for a, b in zip(r["resumed_losses"], r["losses"][2:]))
        assert diff < tol, f"{spec}: resumed {r['resumed_losses']} vs uninterrupted {r['losses'][2:]}"


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["0:fp32", "3:fp32", "3:bf16"])
def test_consolidated_checkpoint_loads_into_a_fresh_model(worker, spec):
    from zero_worker import MODEL, batch

    out, res = worker
    stage, precision = spec.split(":")
    payload = torch.load(res[spec]["final"], map_location="cpu", weights_only=False)
    assert payload["format"] == "vit-accel-train"
    # the optimizer as full tensors in the plain optimizer's layout: one entry per parameter, in group order
    opt = payload["optimizer"]
    assert sum(len(g["params"]) for g in opt["param_groups"]) == len(opt["state"]) == len(payload["model"])
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(opt["state"][0])
    assert payload["deepspeed"]["zero_stage"] == int(stage) and payload["deepspeed"]["world_size"] == 2
    assert payload["vit_config"]["attn_impl"] == "sdpa"
    sd = payload["model"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    model = create_vit("vit-ti16", **MODEL)
    model.load_state_dict(sd)          # strict: every timm key, no extra
    model.eval()
    images, _ = batch(999, 0, 8)
    with torch.no_grad():
        logits = model((images.float() - 127.5) / 127.5)
    trained = torch.load(out / f"logits_{stage}_{precision}.pt")
    tol = 1e-5 if precision == "fp32" else 2e-2 * trained.abs().max().item()
    assert (logits - trained).abs().max().item() < tol
    if precision == "bf16":
        # fp32 masters, not the bf16 working copy: some weights are not bf16-representable
        w = sd["blocks.0.attn.qkv.weight"]
        assert (w.bfloat16().float() != w).any()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["1:fp32", "3:fp32", "3:bf16"])
def test_consolidation_agrees_with_deepspeeds_zero_to_fp32(worker, spec):
    """Our in-memory gather equals DeepSpeed's offline reconstruction of the saved shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, res = worker
    final = Path(res[spec]["final"])
    ours = torch.load(final, map_location="cpu", weights_only=False)["model"]
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(final.with_suffix(".ds")))
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        assert torch.equal(theirs[k].float(), v), k


@pytest.mark.slow
def test_zero3_validation_over_uneven_shards(worker):
    """Same forward calls on every rank (the one out of data keeps pace with blank forwards), each sample once."""
    out, _ = worker
    r0, r1 = (json.loads((out / "eval" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["own_samples"], r1["own_samples"]) == (150, 30)
    assert r0["calls"] == r1["calls"] == 10
    assert sum(r0["images"]) == 150 and sum(n for n in r1["images"][:2]) == 30 and set(r1["images"][2:]) == {1}
    assert r0["val_count"] == r1["val_count"] == 180  # every sample counted once, blanks never
    assert r0["val_loss"] == r1["val_loss"] and r0["val_top1"] == r1["val_top1"]
    # per-class results are collective too: both ranks hold the whole set's counts and mistakes
    for key in ("val_per_class", "val_confusion", "val_mistakes", "val_class_names"):
        assert r0[key] == r1[key], key
    assert sum(map(sum, r0["val_confusion"])) == 180 and sum(p["count"] for p in r0["val_per_class"]) == 180
    assert len(r0["val_mistakes"]) == 10 and r0["val_class_names"] == [str(i) for i in range(10)]


# ---------------------------------------------------------------------------------------
# Another number of processes: ZeRO 1, 2, 3 checkpoints resumed 2 -> 1 and 1 -> 2
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resized(worker, tmp_path_factory):
    """One process loads the two-process worker's checkpoints, then trains and checkpoints on
    global batches; two processes load those and continue (tests/zero_resize_worker.py)."""
    out, _ = worker
    script = ROOT / "tests" / "zero_resize_worker.py"

    def launch(folder):
        one, two = folder / "resize1", folder / "resize2"
        _run([sys.executable, script, "--out", one, "--check",
              str(out / "{stage}_fp32" / "checkpoints" / "step_0000002.pt")], cwd=out, timeout=420)
        _run(_torchrun(script, "--out", two, "--load", str(one / "{stage}" / "step_0000002.pt")), cwd=out, timeout=420)
        return [json.loads((d / "results.json").read_text()) for d in (one, two)]

    return made_once(tmp_path_factory, "zero_resized", launch)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_zero_checkpoint_resumes_on_another_number_of_processes(resized, stage):
    one, two = resized[0][stage], resized[1][stage]
    # 2 -> 1 and 1 -> 2: the restored fp32 weights and optimizer moments are the saved ones, bit for bit
    assert one["restore"] == [0.0, 0.0] and two["restore"] == [0.0, 0.0]
    # the same global batches on 1 and 2 processes: the same losses, uninterrupted or resumed across the change
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < FP32_TOL
    assert max(abs(a - b) for a, b in zip(two["resumed_losses"], one["losses"][2:])) < FP32_TOL


# ---------------------------------------------------------------------------------------
# The real command line: torchrun -m vit_accel train ... --set distributed.zero_stage=N
# ---------------------------------------------------------------------------------------

E2E = ["--config", "vit-ti-digits", "--no-progress", "--set", "schedule.total_steps=4", "--set", "schedule.warmup_steps=1",
       "--set", "train.global_batch_size=32", "--set", "cpu.micro_batch_size=8", "--set", "gpu.micro_batch_size=8",
       "--set", "ipu.gradient_accumulation=2", "--set", "model.depth=2", "--set", "train.log_every=1",
       "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "data.workers=0",
       "--set", "train.eval_batch_size=64", "--set", "data.mixup=0.8", "--set", "data.cutmix=1.0",  # per micro-batch
       # one precision for DDP and every ZeRO stage (auto: bf16 on a native-bf16 CPU, fp32 under ZeRO)
       "--set", "cpu.precision=fp32"]


# Plain DDP (-1) and ZeRO-2 with EMA and layer-wise lr decay. ZeRO-3 through the command line (it
# refuses EMA): tests/test_cluster.py (stopped, resumed, the weights of plain DDP's run, and its
# checkpoint evaluated on one process), and the README's torchrun command (tests/test_readme.py).
DECAY = ["--set", "optim.layer_decay=0.75", "--set", "train.checkpoint_every=2"]
EMA = ["--set", "train.ema_momentum=0.5"]
E2E_STAGES = {-1: DECAY + EMA, 2: DECAY + EMA}


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory):
    if deepspeed_missing:
        pytest.skip("deepspeed is not installed")

    def launch(base):
        for stage, extra in E2E_STAGES.items():
            _run(_torchrun("-m", "vit_accel", "train", "--backend", "cpu", "--run-dir", base / f"z{stage}", *E2E,
                           *extra, "--set", f"data.root={base / 'data'}", "--set", f"distributed.zero_stage={stage}"),
                 cwd=base, timeout=300)
        return str(base)

    base = Path(made_once(tmp_path_factory, "zero_e2e", launch))
    return base, {stage: base / f"z{stage}" for stage in E2E_STAGES}


def _losses(run_dir: Path):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in lines if r.get("kind") == "train"]


@pytest.mark.slow
def test_cli_zero2_reaches_the_data_parallel_loss_curve(e2e_runs):
    _, runs = e2e_runs
    ddp, zero = _losses(runs[-1]), _losses(runs[2])
    assert [s for s, _ in ddp] == [1, 2, 3, 4] and [s for s, _ in zero] == [1, 2, 3, 4]
    diff = max(abs(a - b) for (_, a), (_, b) in zip(ddp, zero))
    assert diff < FP32_TOL, f"ZeRO-2 {zero} vs plain data parallel {ddp}"
    assert (runs[2] / "checkpoints" / "step_0000004.pt").is_file()
    assert (runs[2] / "checkpoints" / "step_0000004.ds" / "latest").is_file()


@pytest.mark.slow
def test_cli_zero2_ema_and_layer_decay_match_data_parallel(e2e_runs):
    """EMA and layer-wise lr decay across processes: ZeRO-2 (gloo, CPU) against plain DDP on the same data."""
    _, runs = e2e_runs
    ema = {s: torch.load(runs[s] / "checkpoints" / "step_0000004.pt", map_location="cpu", weights_only=False)["ema"]
           for s in (-1, 2)}
    assert ema[-1]["steps"] == ema[2]["steps"] == 4
    worst = max((ema[-1]["params"][k] - ema[2]["params"][k]).abs().max().item() for k in ema[-1]["params"])
    assert worst < 1e-5, worst
    summaries = {s: json.loads((runs[s] / "summary.json").read_text()) for s in (-1, 2)}
    assert abs(summaries[-1]["ema_val_loss"] - summaries[2]["ema_val_loss"]) < 1e-4


@pytest.mark.slow
@needs_deepspeed
def test_zero3_ema_is_refused_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vit_accel", "train", "--backend", "cpu", "--run-dir",
                        str(tmp_path / "r"), *E2E, *DECAY, *EMA, "--set", "distributed.zero_stage=3"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "zero_stage 3" in err[0] and "train.ema_momentum=0" in err[0], p.stderr


# ---------------------------------------------------------------------------------------
# Launchers (launch/): real torchrun and deepspeed launchers, a cheap command on CPU
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"])
def test_launch_scripts_parse_and_have_a_usage_header(script):
    path = ROOT / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)], timeout=30).returncode == 0
    head = path.read_text().splitlines()[:12]
    assert any("Usage" in line for line in head)


def _launch(script, env_extra, *args):
    env = _env()
    env.update(PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""), PYTHON=sys.executable,
               MASTER_PORT=str(free_port()), **env_extra)
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_torchrun_launcher_starts_one_process_per_slot():
    p = _launch("torchrun.sh", {"NPROC_PER_NODE": "2"}, "configs")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("vit-ti-digits") == 2


@pytest.mark.slow
@pytest.mark.skipif(deepspeed_missing, reason="deepspeed is not installed")
def test_deepspeed_launcher_passes_local_rank_that_the_cli_accepts():
    p = _launch("deepspeed.sh", {}, "--num-gpus", "2", "configs")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("vit-ti-digits") == 2


def test_launchers_without_a_command_explain_and_exit_2():
    for script in ("torchrun.sh", "deepspeed.sh"):
        p = _launch(script, {})
        assert p.returncode == 2 and "give the vit-accel command" in p.stderr
