"""Files from users never run code: pickles that try, on every way in.

tests/trust_payloads.py generates the pickles: every opcode that reaches a global (GLOBAL,
STACK_GLOBAL with dotted names, INST, OBJ, NEWOBJ, NEWOBJ_EX, BUILD, EXT1/2/4, persistent ids),
for targets under every module the strict unpickler's tables touch and under others, wrapped as
real torch zip and legacy checkpoints. The premise is checked (the full unpickler does run the
live ones); then every reader and every command must refuse each, naming what it refused, and
no marker file may appear. Benign mmengine/mmcv/timm files must still load.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import trust_payloads as tp
from vit_accel.checkpoints import CheckpointError, load_pretrained, model_from_checkpoint
from vit_accel.checkpoints.files import load_plain, load_untrusted, read
from vit_accel.checkpoints.unpickle import StandIn, StrictUnpickler, pickle_module
from vit_accel.cli import main
from vit_accel.model import create_vit

ROOT = Path(__file__).resolve().parent.parent
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
DIGITS_MODEL = dict(img_size=32, patch_size=4, depth=1, num_classes=10, global_pool="avg")
TINY = ["--set", "model.depth=1", "--set", "train.global_batch_size=16", "--set", "cpu.micro_batch_size=16",
        "--set", "data.workers=1", "--set", "train.eval_every=0", "--set", "train.eval_batch_size=128"]


def _env(**extra):
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _digits_sd():
    return {k: v.detach().clone() for k, v in create_vit("vit-ti16", **DIGITS_MODEL).state_dict().items()}


class _Attack:
    """Every payload as a zip and a legacy checkpoint, with its marker folder."""

    def __init__(self, root: Path):
        self.root, self.markers, self.files = root, root / "markers", root / "files"
        self.markers.mkdir(parents=True)
        self.files.mkdir()
        self.payloads = tp.payloads(str(self.markers))
        self.by_name = {p.name: p for p in self.payloads}
        self.paths = []                               # (payload, path, container)
        for p in self.payloads:
            for container in ("zip", "legacy"):
                path = str(self.files / ("%s.%s.pt" % (p.name, container)))
                tp.torch_checkpoint(path, p, legacy=container == "legacy")
                self.paths.append((p, path, container))

    def ran(self):
        return sorted(os.listdir(self.markers))


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    """copyreg extension codes the EXT payloads use, registered in this process as a library might."""
    c = tp.extension_codes(tp.targets())
    path = tmp_path_factory.mktemp("codes") / "codes.json"
    tp.save_codes(str(path), c)
    tp.register_extensions(c)
    yield str(path)
    tp.unregister_extensions(c)


@pytest.fixture(scope="module")
def attack(tmp_path_factory, codes):
    return _Attack(tmp_path_factory.mktemp("attack"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from vit_accel.data.digits import ensure_digits

    root = str(tmp_path_factory.mktemp("data"))
    ensure_digits(root)
    return root


def _refusal(e: Exception, payload) -> str:
    msg = str(e)
    assert "refused" in msg and payload.expect in msg, (payload.name, msg)
    return msg


# ---------------------------------------------------------------------------------------
# The premise: the payloads are live
# ---------------------------------------------------------------------------------------

PREMISE = r"""
import json, sys, warnings
import torch
import trust_payloads as tp
warnings.simplefilter("ignore")
tp.register_extensions(tp.load_codes(sys.argv[1]))
for path in json.load(open(sys.argv[2])):
    try:
        torch.load(path, map_location="cpu", weights_only=False, pickle_module=__import__("pickle"))
    except Exception:
        pass        # a payload may break the rest of the file after it ran
"""


def test_the_live_payloads_do_run_under_the_full_unpickler(tmp_path, codes):
    """The other tests assert that nothing happens; here the same payloads, read with the full
    unpickler (what --trust-checkpoint and DeepSpeed use), create their markers."""
    premise = _Attack(tmp_path / "premise")
    live = [(p, path) for p, path, container in premise.paths if container in p.live]
    assert len(live) > 100 and {p.name.rsplit("-", 1)[-1] for p, _ in live} >= {
        "GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "EXT", "NEWOBJ", "NEWOBJ_EX", "BUILD", "PERSID", "chain"}
    (tmp_path / "live.json").write_text(json.dumps([path for _, path in live]))
    subprocess.run([sys.executable, "-c", PREMISE, codes, str(tmp_path / "live.json")], cwd=tmp_path, env=_env(),
                   check=True, timeout=300, capture_output=True)
    assert premise.ran() == sorted(set(p.name for p, _ in live))


# ---------------------------------------------------------------------------------------
# Every reader, in-process: every payload, zip and legacy
# ---------------------------------------------------------------------------------------

def test_every_reader_refuses_every_payload_and_nothing_runs(attack, tmp_path):
    from vit_accel.backends.base import read_checkpoint
    from vit_accel.engine.ema import load_ema_weights

    model = create_vit("vit-ti16", **DIGITS_MODEL)
    for p, path, container in attack.paths:
        hf = tmp_path / ("hf-" + os.path.basename(path))
        hf.mkdir()
        os.symlink(path, hf / "pytorch_model.bin")
        readers = [read, load_plain, load_untrusted, lambda f: read(str(hf)),
                   lambda f: read_checkpoint(Path(f), False, "cpu"), lambda f: load_ema_weights(model, f)]
        if container == "zip":       # the commands' own functions, once per payload
            readers += [lambda f: load_pretrained(model, f), lambda f: model_from_checkpoint(f)]
        for reader in readers:
            with pytest.raises(CheckpointError) as e:
                reader(path)
            _refusal(e.value, p)
    assert attack.ran() == []


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="ZeRO resume needs deepspeed")
def test_zero_resume_check_refuses_every_payload_in_any_file_of_the_folder(attack, tmp_path):
    from vit_accel.backends.zero import check_deepspeed_checkpoint

    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for i, (p, path, _) in enumerate(attack.paths):
        ds = tmp_path / ("%d.ds" % i)
        (ds / "step_2").mkdir(parents=True)
        (ds / "latest").write_text("step_2")
        torch.save({"module": tp.small_state_dict()}, ds / "step_2" / names[0])
        os.symlink(path, ds / "step_2" / names[1 + i % 2])
        with pytest.raises(CheckpointError) as e:
            check_deepspeed_checkpoint(ds)
        assert names[1 + i % 2] in _refusal(e.value, p) and "--trust-checkpoint" in str(e.value)
    assert attack.ran() == []


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="ZeRO resume needs deepspeed")
def test_zero_resume_check_refuses_a_latest_tag_that_leaves_the_folder(tmp_path):
    from vit_accel.backends.zero import check_deepspeed_checkpoint

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ds = tmp_path / "step_2.ds"
    ds.mkdir()
    for tag in ("../elsewhere", str(elsewhere), "nothing-there"):
        (ds / "latest").write_text(tag)
        with pytest.raises(CheckpointError, match="latest: refused: it names .*not a checkpoint folder inside"):
            check_deepspeed_checkpoint(ds)


# ---------------------------------------------------------------------------------------
# Every command, as users meet them: one process runs each command on a batch of payloads
# ---------------------------------------------------------------------------------------

DRIVER = r"""
import contextlib, io, json, sys, warnings
warnings.simplefilter("ignore")
import trust_payloads as tp
spec = json.load(open(sys.argv[1]))
tp.register_extensions(tp.load_codes(spec["codes"]))
import poptorch_double
sys.modules["poptorch"] = poptorch_double      # the IPU backend's PopTorch (tests/poptorch_double.py)
from vit_accel.cli import main
results = []
for argv in spec["runs"]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except BaseException as e:
            rc = "raised %r" % (e,)
    results.append({"argv": argv, "rc": rc, "err": err.getvalue(), "out": out.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""

IPU = ["--set", "ipu.splits=[patch_embed]", "--set", "ipu.ipus_per_replica=1", "--set", "ipu.micro_batch_size=4", "--set", "ipu.gradient_accumulation=4",
       "--set", "ipu.replicas=1", "--set", "ipu.half=false", "--set", "ipu.loader_mode=sync"]
# one payload per way in (the in-process tests take them all)
CLI_WAYS = ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "EXT", "NEWOBJ_EX", "BUILD", "PERSID", "getattr-chain",
            "persid-module-allowed", "ext-unregistered")


def _cli_sample(attack):
    """(payload, file) per way in, dotted names apart; zip and legacy files alternate."""
    picked, seen = [], set()
    for p in attack.payloads:
        way = p.name.rsplit("-", 1)[-1] if p.name[0].isdigit() else p.name
        key = (way, p.proto)
        if way in CLI_WAYS and key not in seen:
            seen.add(key)
            container = "legacy" if len(picked) % 2 else "zip"
            picked.append((p, next(f for q, f, c in attack.paths if q is p and c == container)))
    return picked


@pytest.mark.slow
def test_every_command_refuses_and_runs_nothing_benign_files_load(attack, data_root, codes, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    sample = _cli_sample(attack)
    assert len(sample) >= 10
    recipe = ["--config", "vit-ti-digits", "--set", "data.root=%s" % data_root] + TINY
    runs, expect = [], []
    for i, (p, path) in enumerate(sample):
        hf = tmp_path / ("hf%d" % i)
        hf.mkdir()
        os.symlink(path, hf / "pytorch_model.bin")
        (hf / "config.json").write_text(json.dumps({"model_type": "vit", "num_attention_heads": 3}))
        mmcls = tmp_path / ("mmcls%d.pth" % i)
        os.symlink(path, mmcls)
        commands = [
            ["inspect", path], ["convert", path, str(tmp_path / ("out%d.safetensors" % i)), "--to", "vit-accel"],
            ["predict", "--checkpoint", path, str(tmp_path / "x.png")], ["inspect", str(hf)],
            ["convert", str(mmcls), str(tmp_path / ("out%d.pth" % i)), "--to", "timm"],
            ["eval", "--backend", "cpu", "--checkpoint", path] + recipe,
            ["eval", "--backend", "cpu", "--ema", "--checkpoint", path] + recipe,
            ["train", "--backend", "cpu", "--run-dir", str(tmp_path / ("p%d" % i)), "--no-progress",
             "--set", "model.pretrained=%s" % path] + recipe,
            ["train", "--backend", "cpu", "--run-dir", str(tmp_path / ("r%d" % i)), "--no-progress",
             "--resume", path] + recipe,
            ["train", "--backend", "ipu", "--run-dir", str(tmp_path / ("i%d" % i)), "--no-progress",
             "--resume", path] + recipe + IPU,
        ]
        runs += commands
        expect += [p] * len(commands)
    sd = {k: v for k, v in create_vit("vit-ti16", img_size=32, patch_size=8, depth=2).state_dict().items()}
    foreign = tp.write_foreign(str(tmp_path / "foreign.pth"), sd)
    runs += [["inspect", foreign], ["convert", foreign, str(tmp_path / "foreign.safetensors"), "--to", "vit-accel"]]
    (tmp_path / "spec.json").write_text(json.dumps({"codes": codes, "runs": runs}))
    subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "spec.json"), str(tmp_path / "results.json")],
                   cwd=tmp_path, env=_env(), check=True, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    bad = [(p.name, r) for r, p in zip(results, expect)
           if r["rc"] != 2 or "refused" not in r["err"] or p.expect not in r["err"] or "Traceback" in r["err"]]
    assert not bad, bad[:3]
    assert attack.ran() == []
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]        # convert wrote nothing
    inspect, convert = results[-2:]
    assert inspect["rc"] == 0 and "format               timm" in inspect["out"], inspect
    assert convert["rc"] == 0 and "kept as inert data" in convert["out"], convert
    for name in ("HistoryBuffer", "ConfigDict", "Namespace"):
        assert name in convert["out"], convert


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="ZeRO resume needs deepspeed")
def test_zero_resume_command_refuses_the_folder_before_deepspeed_reads_it(attack, data_root, tmp_path):
    """`vit-accel train --resume` of a ZeRO run: the .ds folder beside the checkpoint holds a
    payload; the real command (its own process, DeepSpeed initialized) refuses it, naming the file."""
    p = attack.by_name[next(n for n in attack.by_name if n.endswith("-posix-system-GLOBAL"))]
    ckpt = tmp_path / "step_0000002.pt"
    torch.save({"format": "vit-accel-train", "model": _digits_sd(), "step": 2}, ckpt)
    ds = tmp_path / "step_0000002.ds"
    (ds / "step_0000002").mkdir(parents=True)
    (ds / "latest").write_text("step_0000002")
    evil = ds / "step_0000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    tp.torch_checkpoint(str(evil), p)
    r = subprocess.run([sys.executable, "-m", "vit_accel", "train", "--config", "vit-ti-digits", "--resume", str(ckpt),
                        "--run-dir", str(tmp_path / "run"), "--no-progress", "--set", "data.root=%s" % data_root,
                        "--set", "distributed.zero_stage=1"] + TINY, cwd=tmp_path, capture_output=True, text=True,
                       env=_env(TORCH_EXTENSIONS_DIR=str(ROOT / "build" / "torch_extensions")), timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert str(evil) in r.stderr and "refused" in r.stderr and p.expect in r.stderr, r.stderr[-3000:]
    assert "--trust-checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert attack.ran() == []


# ---------------------------------------------------------------------------------------
# The strict unpickler itself
# ---------------------------------------------------------------------------------------

def test_an_extension_code_resolved_before_is_resolved_again_through_the_table(codes):
    """copyreg caches what an EXT code resolved to, process-wide: a file read with the full
    unpickler first must not hand the strict one the real object."""
    import io
    import pickle

    code = next(c for c, key in tp.extension_codes(tp.targets()).items() if key == ("trust_payloads", "touch"))
    data = b"\x80\x02" + tp.ext(code) + pickle.STOP
    assert pickle.loads(data) is tp.touch           # the cache now holds the real function
    with pytest.raises(pickle.UnpicklingError, match="trust_payloads.touch"):
        StrictUnpickler(io.BytesIO(data)).load()


def test_stand_ins_keep_the_data_and_have_no_code():
    import io
    import pickle

    ops = tp.call(tp.glob("argparse", "Namespace")) + tp.dict_of(lr=tp.text("0.1")) + pickle.BUILD
    ns = StrictUnpickler(io.BytesIO(b"\x80\x02" + ops + pickle.STOP)).load()
    assert isinstance(ns, StandIn) and ns.state == {"lr": "0.1"} and ns.standin_of == "argparse.Namespace"
    assert type(ns).__module__ == "opaque.argparse" and not hasattr(ns, "lr")
    hub_method = StrictUnpickler(io.BytesIO(b"\x80\x02" + tp.call(tp.glob("builtins", "getattr"), tp.glob(
        "mmengine.logging.history_buffer", "HistoryBuffer"), tp.text("min")) + pickle.STOP)).load()
    assert hub_method.standin_of == "mmengine.logging.history_buffer.HistoryBuffer.min"
    assert isinstance(hub_method(), StandIn)         # calling it builds another inert stand-in


# ---------------------------------------------------------------------------------------
# Benign foreign files
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_mmengine_mmcls_timm_files_load_with_their_meta_as_data(tmp_path, legacy):
    model = create_vit("vit-ti16", img_size=32, patch_size=8, depth=2, num_classes=5)
    path = tp.write_foreign(str(tmp_path / "mm.pth"), model.state_dict(), legacy=legacy)
    obj = load_untrusted(path)
    meta = obj["meta"]
    assert meta["best_top1"] == 81.5 and type(meta["best_top1"]) is np.float64 and meta["seed"] == 7
    assert meta["dtype"] == np.dtype("float32") and meta["hist"].dtype == np.float16 and meta["hist"].shape == (2, 3)
    assert type(meta["by_class"]) is collections.defaultdict and meta["by_class"]["cat"] == [1, 2]
    assert meta["by_class"].default_factory is list and meta["counts"]["new"] == 0 and meta["nested"]["k"] == {}
    assert meta["np_rng"][0] == "MT19937" and meta["np_rng"][1].dtype == np.uint32
    assert (meta["tags"], meta["frozen"], meta["c"], meta["raw"], meta["buf"]) == ({"x", "y"}, frozenset([1]), 1 + 2j,
                                                                                   b"\x00\x01", bytearray(b"ab"))
    assert meta["cfg"]["lr"] == 0.1 and meta["cfg"].standin_of == "mmengine.config.config.ConfigDict"
    assert meta["mmcv_cfg"]["layers"] == [1, 2] and meta["mmcv_cfg"]["optimizer"]["type"] == "SGD"
    hub = obj["message_hub"]["log_scalars"]["loss"]
    assert hub.standin_of == "mmengine.logging.history_buffer.HistoryBuffer"
    assert list(hub.state["_log_history"]) == [0.5, 0.25]
    assert obj["args"].state == {"model": "vit_base_patch16_224", "lr": 0.001, "output": "runs"}
    loaded, report = model_from_checkpoint(path)
    torch.testing.assert_close(loaded.state_dict()["head.weight"], model.state_dict()["head.weight"])
    assert any("kept as inert data" in n and "HistoryBuffer" in n for n in report.notes), report.notes


def test_real_mmengine_and_mmcv_objects_load(tmp_path):
    mmengine = pytest.importorskip("mmengine", reason="mmengine is not installed (the replica test above runs)")
    from mmengine.config import ConfigDict
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("trust-test")
    hub.update_scalar("train/loss", 0.5)
    hub.update_info("iter", 3)
    sd = create_vit("vit-ti16", img_size=32, patch_size=8, depth=2, num_classes=5).state_dict()
    meta = {"cfg": ConfigDict(model=dict(type="ViT")), "mmengine_version": mmengine.__version__}
    try:
        from mmcv.utils import ConfigDict as MMCVConfigDict

        meta["mmcv"] = MMCVConfigDict(a=dict(b=1))
    except ImportError:
        pass
    torch.save({"meta": meta, "state_dict": sd, "message_hub": hub.state_dict()}, tmp_path / "real.pth")
    obj = load_untrusted(tmp_path / "real.pth")
    assert obj["meta"]["cfg"]["model"]["type"] == "ViT"
    assert obj["message_hub"]["log_scalars"]["train/loss"].state["_log_history"].tolist() == [0.5]
    assert "mmcv" not in meta or obj["meta"]["mmcv"]["a"]["b"] == 1
    assert read(str(tmp_path / "real.pth")).format == "timm"


def test_our_training_checkpoint_may_not_hold_stand_ins(tmp_path):
    with tp.foreign_classes():
        torch.save({"format": "vit-accel-train", "model": _digits_sd(), "hub": tp.HistoryBuffer()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="training checkpoint holds tensors and plain types only.*HistoryBuffer"):
        read(str(tmp_path / "s.pt"))
    with pytest.raises(CheckpointError, match="refused: its pickle asks for mmengine.*--trust-checkpoint"):
        load_plain(str(tmp_path / "s.pt"))


def test_torchscript_archives_are_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
    with pytest.raises(CheckpointError, match="TorchScript archive: loading one runs the code it holds"):
        read(str(tmp_path / "ts.pt"))


def test_the_strict_reader_is_a_pickle_module_torch_load_accepts(tmp_path):
    """What DeepSpeed and friends pass ``pickle_module=``: the same reader, from any caller."""
    torch.save({"w": torch.ones(2), "n": np.float32(2.0)}, tmp_path / "a.pt")
    obj = torch.load(tmp_path / "a.pt", map_location="cpu", weights_only=False, pickle_module=pickle_module())
    assert obj["w"].tolist() == [1.0, 1.0] and obj["n"] == 2.0


# ---------------------------------------------------------------------------------------
# Resume: our own checkpoints read strictly; --trust-checkpoint is the only full unpickler
# ---------------------------------------------------------------------------------------

class Custom:
    """An object of a class no table lists (as an older vit-accel or a user's hook might save)."""

    def __init__(self, x):
        self.x = x


@pytest.mark.slow
def test_training_checkpoints_resume_strictly_and_trust_is_the_only_full_unpickler(tmp_path, data_root, capsys):
    rd = tmp_path / "run"
    args = ["train", "--config", "vit-ti-digits", "--no-progress", "--set", f"data.root={data_root}",
            "--set", "schedule.total_steps=1", "--set", "schedule.warmup_steps=0"] + TINY
    assert main(args + ["--run-dir", str(rd)]) == 0
    state = torch.load(rd / "checkpoints" / "step_0000001.pt", map_location="cpu", weights_only=True)
    assert state["format"] == "vit-accel-train" and isinstance(state["rng"]["numpy"][1], torch.Tensor)  # no numpy
    capsys.readouterr()

    # an older version's checkpoint (numpy RNG state) is data: it resumes without the flag
    old = dict(state)
    kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
    old["rng"] = dict(state["rng"], numpy=(kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.save(old, tmp_path / "old.pt")
    assert main(args + ["--run-dir", str(tmp_path / "a"), "--resume", str(tmp_path / "old.pt")]) == 0
    assert "resumed from" in capsys.readouterr().out

    # an object of another class needs the flag that names the risk, and the flag reads it
    torch.save(dict(old, hook=Custom(3)), tmp_path / "custom.pt")
    resume = args + ["--run-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "custom.pt")]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "test_trust.Custom" in err and "--trust-checkpoint" in err and "Traceback" not in err
    assert main(resume + ["--trust-checkpoint"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # readers that need no optimizer state never take it: they refuse, naming the class
    with pytest.raises(CheckpointError, match="test_trust.Custom"):
        load_pretrained(create_vit("vit-ti16", **DIGITS_MODEL), str(tmp_path / "custom.pt"))


# ---------------------------------------------------------------------------------------
# Shards: a manifest nobody named never changes which files are read, or runs a command
# ---------------------------------------------------------------------------------------

def _shards(tmp_path):
    from vit_accel.data.shards import read_manifest

    d = tmp_path / "shards"
    assert main(["make-shards", "--source", "csv", "--input", str(_csv(tmp_path)), "--output", str(d),
                 "--samples-per-shard", "3", "--workers", "1"]) == 0
    return d, read_manifest(str(next(d.glob("*.json"))))


def _csv(tmp_path):
    from PIL import Image

    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / ("%d.png" % i))
        rows.append("%d.png,%d" % (i, i % 2))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "labels.csv"


def test_a_manifest_beside_tar_paths_gives_counts_only_and_a_folders_gives_no_command(tmp_path, capsys):
    from vit_accel.data import DataError, resolve_shards
    from vit_accel.data.eval_loader import EvalLoader

    d, m = _shards(tmp_path)
    marker = tmp_path / "PWNED"
    m["base"] = "pipe:touch %s; cat %s/{name}" % (marker, d)
    manifest = next(d.glob("*.json"))
    manifest.write_text(json.dumps(m))
    tars = sorted(str(p) for p in d.glob("*.tar"))
    explicit = resolve_shards("%s/{%s}" % (d, ",".join(os.path.basename(t) for t in tars)))
    assert explicit.urls == tars and explicit.counts == [s["samples"] for s in m["shards"]]
    assert sum(1 for _ in EvalLoader(explicit, 8, 4)) > 0
    with pytest.raises(DataError, match="sets \"base\".*a URL or command.*name the manifest itself"):
        resolve_shards(str(d))
    assert not marker.exists()
    capsys.readouterr()
    named = resolve_shards(str(manifest))                   # named: its command is used, and said first
    err = capsys.readouterr().err
    assert "read through shell commands; the first it will run: touch %s; cat" % marker in err
    assert named.urls[0].startswith("pipe:") and not marker.exists()
    assert sum(1 for _ in EvalLoader(named, 8, 4)) > 0 and marker.exists()
    resolve_shards(str(manifest))
    assert "shell commands" not in capsys.readouterr().err   # once per spec
