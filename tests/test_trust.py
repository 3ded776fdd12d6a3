"""Files from users are untrusted: a checkpoint whose pickle would run code never runs it, on any path.

Each entry point (predict, train --resume, model.pretrained, eval, convert, inspect) gets a
``step_N.pt`` whose pickle calls ``os.system("touch PWNED")`` when fully unpickled: no file may
appear and the error must name what was refused.
"""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vit_accel.checkpoints import CheckpointError, load_pretrained
from vit_accel.checkpoints.files import _TolerantUnpickler, load_plain, read
from vit_accel.cli import main
from vit_accel.model import create_vit

TINY_MODEL = ["--set", "model.depth=1", "--set", "train.global_batch_size=16", "--set", "cpu.micro_batch_size=16",
              "--set", "data.workers=1", "--set", "train.log_every=2", "--set", "train.eval_every=0",
              "--set", "train.eval_batch_size=128"]


class _Payload:
    """Pickles as a call of ``fn(*args)``: what a malicious checkpoint carries."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Hub:
    """An object of a class the reader does not know; building it (``__setstate__``) writes a file."""

    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).write_text("ran")


def _digits_model_sd():
    model = create_vit("vit-ti16", img_size=32, patch_size=4, depth=1, num_classes=10, global_pool="avg")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _evil_checkpoint(path: Path, marker: Path, fn=os.system, format="vit-accel-train") -> Path:
    payload = {"model": _digits_model_sd(), "step": 2, "note": _Payload(fn, "touch %s" % marker)}
    if format:
        payload["format"] = format
    torch.save(payload, path)
    return path


@pytest.fixture()
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    return _evil_checkpoint(tmp_path / "step_0000002.pt", marker), marker


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _refused(capsys, marker: Path) -> str:
    err = capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's code ran"
    assert "posix.system" in err or "os.system" in err, err
    assert "Traceback" not in err
    return err


def test_predict_refuses_a_pickled_program(evil, tmp_path, capsys):
    ckpt, marker = evil
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "x.png")]) == 2
    _refused(capsys, marker)


def test_resume_refuses_a_pickled_program_and_names_the_flag(evil, tmp_path, data_root, capsys):
    ckpt, marker = evil
    assert main(["train", "--config", "vit-ti-digits", "--run-dir", str(tmp_path / "run"), "--no-progress",
                 "--set", f"data.root={data_root}", "--resume", str(ckpt)] + TINY_MODEL) == 2
    err = _refused(capsys, marker)
    assert "refused to unpickle" in err and "--trust-checkpoint" in err


def test_pretrained_eval_convert_inspect_refuse_a_pickled_program(evil, tmp_path, data_root, capsys):
    ckpt, marker = evil
    assert main(["train", "--config", "vit-ti-digits", "--run-dir", str(tmp_path / "run"), "--no-progress",
                 "--set", f"data.root={data_root}", "--set", f"model.pretrained={ckpt}"] + TINY_MODEL) == 2
    _refused(capsys, marker)
    assert main(["eval", "--config", "vit-ti-digits", "--checkpoint", str(ckpt),
                 "--set", f"data.root={data_root}"] + TINY_MODEL) == 2
    _refused(capsys, marker)
    assert main(["convert", str(ckpt), str(tmp_path / "out.safetensors"), "--to", "vit-accel"]) == 2
    _refused(capsys, marker)
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["inspect", str(ckpt)]) == 2
    _refused(capsys, marker)


@pytest.mark.parametrize("fn", [os.system, exec, eval, open, getattr])
def test_tolerant_reader_never_calls_what_a_pickle_names(tmp_path, fn):
    marker = tmp_path / "PWNED"
    path = _evil_checkpoint(tmp_path / "w.pth", marker, fn=fn, format=None)
    with pytest.raises(CheckpointError, match="refused: unpickling it would call .*nothing was run"):
        read(str(path))
    assert not marker.exists()


def test_objects_of_other_classes_stay_inert_and_are_reported(tmp_path):
    # a class the reader does not know (as mmengine's message_hub) is replaced by an inert stand-in, not imported
    marker = tmp_path / "PWNED"
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": _digits_model_sd(), "meta": {"hub": _Hub(str(marker))}}, path)
    src = read(str(path))
    assert src.format == "timm" and "patch_embed.proj.weight" in src.tensors
    assert any("test_trust._Hub" in n and "not imported" in n for n in src.notes), src.notes
    assert not marker.exists()
    torch.load(path, weights_only=False)    # the full unpickler runs the class's code: the test's premise
    assert marker.exists()
    marker.unlink()
    # the same object inside our own training format is refused: ours holds tensors and plain types only
    torch.save({"format": "vit-accel-train", "model": _digits_model_sd(), "hub": _Hub(str(marker))}, path)
    with pytest.raises(CheckpointError, match="training checkpoint holds tensors and plain types only.*"
                                              "test_trust._Hub"):
        read(str(path))
    assert not marker.exists()


def test_tolerant_unpickler_has_no_path_to_code():
    # every global it resolves is a tensor rebuild, a container or a numpy/torch type: nothing that executes
    import io

    for module, name in [("os", "system"), ("builtins", "exec"), ("subprocess", "Popen"), ("torch", "load"),
                         ("torch.hub", "load"), ("pathlib", "Path.write_text"), ("numpy", "load")]:
        found = _TolerantUnpickler(io.BytesIO(b"")).find_class(module, name)
        assert isinstance(found, type) and found.__module__.startswith("opaque."), (module, name)
    data = pickle.dumps(_Payload(os.system, "echo never"), protocol=4)
    obj = _TolerantUnpickler(io.BytesIO(data)).load()
    assert type(obj).__module__ == "opaque.posix" and obj.args == ("echo never",)


@pytest.mark.slow
def test_training_checkpoints_read_with_weights_only(tmp_path, data_root, capsys):
    rd = tmp_path / "run"
    assert main(["train", "--config", "vit-ti-digits", "--run-dir", str(rd), "--no-progress",
                 "--set", f"data.root={data_root}", "--set", "schedule.total_steps=2",
                 "--set", "schedule.warmup_steps=1"] + TINY_MODEL) == 0
    ckpt = rd / "checkpoints" / "step_0000002.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)   # no objects, no numpy
    assert state["format"] == "vit-accel-train" and isinstance(state["rng"]["numpy"][1], torch.Tensor)
    out = capsys.readouterr().out
    assert "run already complete" not in out

    # resuming the finished run says so, exits 0 and prints its real summary
    summary = json.loads((rd / "summary.json").read_text())
    assert main(["train", "--config", "vit-ti-digits", "--run-dir", str(rd), "--no-progress",
                 "--set", f"data.root={data_root}", "--set", "schedule.total_steps=2",
                 "--set", "schedule.warmup_steps=1", "--resume", "auto"] + TINY_MODEL) == 0
    out = capsys.readouterr().out
    assert "run already complete: step 2 of schedule.total_steps 2" in out
    assert f"train loss {summary['train_loss']:.4f}" in out and "nan" not in out
    assert f"{summary['images_per_second']:.1f} images/s" in out and " 0.0 images/s" not in out
    assert json.loads((rd / "summary.json").read_text()) == summary

    # a checkpoint of an older version (numpy arrays in it) needs the flag that names the risk
    old = dict(state)
    kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
    old["rng"] = dict(state["rng"], numpy=(kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    old["step"] = 1
    old_path = rd / "checkpoints" / "old.pt"
    torch.save(old, old_path)
    with pytest.raises(CheckpointError, match="refused to unpickle numpy.*--trust-checkpoint"):
        load_plain(str(old_path))
    resume = ["train", "--config", "vit-ti-digits", "--run-dir", str(tmp_path / "again"), "--no-progress",
              "--set", f"data.root={data_root}", "--set", "schedule.total_steps=2",
              "--set", "schedule.warmup_steps=1", "--resume", str(old_path)] + TINY_MODEL
    assert main(resume) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert main(resume + ["--trust-checkpoint"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # and every reader that needs no optimizer state reads it without the flag (no code runs)
    model = create_vit("vit-ti16", img_size=32, patch_size=4, depth=1, num_classes=10, global_pool="avg")
    assert load_pretrained(model, str(old_path)).loaded > 0
