"""The README is a contract: every command in its code blocks parses with the real CLI parser and
names only recipe keys that exist; those that can run on a CPU run here, scaled down with --set.

Commands are discovered, not listed: a new README command is checked without touching this file.
GPU / IPU / multi-node commands are parsed (launcher options stripped; poprun.sh prints its
command with --dry-run). Synopsis lines (``[--json]``, ``{a,b}``, ``...``) are checked flag by flag.
NOT_RUN is the short list of commands that are not run, each with its reason.
"""
import argparse
import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from vit_accel.cli import build_parser
from vit_accel.config import load_recipe

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

# Commands (by prefix) that are not run here, and why. Everything else that needs no GPU or IPU runs.
NOT_RUN = {
    "make test": "the suite this test belongs to",
    "vit-accel make-shards --source imagenet": "needs the ImageNet tree on disk (parsed here)",
    "vit-accel eval --config timm-vit-b16-r50-384": "needs timm's published weights file and ImageNet shards (parsed "
                                                    "here; tests/test_converted_rows.py runs every row's eval on "
                                                    "tiny shards)",
}
# Scaled-down runs (fewer steps, one block; the batch arithmetic stays the recipe's): the README's
# checkpoint of the full 600-step default is this run's last one
SCALE_STEPS = 4
SCALE = ["schedule.total_steps=%d" % SCALE_STEPS, "schedule.warmup_steps=1", "model.depth=1", "train.eval_every=0",
         "train.checkpoint_every=0", "train.log_every=2", "data.workers=1"]
SUBSTITUTE = {"step_0000600.pt": "step_%07d.pt" % SCALE_STEPS}


# ---------------------------------------------------------------------------------------
# Finding the commands
# ---------------------------------------------------------------------------------------

def code_blocks(text: str) -> List[Tuple[int, List[str]]]:
    """(first line number, lines) of every fenced (```) and indented (4 spaces) code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            blocks.append((i + 2, lines[i + 1:j]))
            i = j + 1
        elif line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append((i + 1, [ln[4:] for ln in lines[i:j]]))
            i = j
        else:
            i += 1
    return blocks


def readme_commands() -> List[Tuple[int, str]]:
    """(line number, command): continuation lines joined, output lines (#...) and prompts (node0$) dropped."""
    out = []
    for start, lines in code_blocks(README.read_text()):
        cmd, first = "", start
        for n, line in enumerate(lines, start):
            s = line.strip()
            if not cmd and (not s or s.startswith("#")):
                continue
            if not cmd:
                first = n
                s = re.sub(r"^\S+\$\s+", "", s)        # "node0$ launch/..." -> "launch/..."
            cmd += " " + s
            if cmd.endswith("\\"):
                cmd = cmd[:-1]
                continue
            out.append((first, cmd.strip()))
            cmd = ""
    return out


def tokens(cmd: str) -> List[str]:
    return shlex.split(cmd, comments=True)


def is_synopsis(tok: List[str]) -> bool:
    return any(t == "..." or t.startswith(("[", "{")) or (t.endswith(("...", "...]")) and "=" not in t) for t in tok)


def not_run_reason(cmd: str) -> Optional[str]:
    return next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)


def vit_accel_argv(tok: List[str]) -> Optional[List[str]]:
    """The `vit-accel` arguments of a command, whatever launches it; None for other programs."""
    if tok[0] == "vit-accel":
        return tok[1:]
    if "-m" in tok and tok[tok.index("-m") + 1:tok.index("-m") + 2] == ["vit_accel"]:
        return tok[tok.index("-m") + 2:]
    if tok[0] == "launch/poprun.sh":   # the script prints the command it would run
        env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))
        out = subprocess.run(["bash", str(REPO / tok[0]), "--dry-run"] + tok[1:], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return vit_accel_argv(shlex.split(out.stdout))
    if tok[0] == "sbatch" and "launch/slurm.sbatch" in tok:   # sbatch options, the script, the command
        return tok[tok.index("launch/slurm.sbatch") + 1:]
    if tok[0].startswith("launch/"):   # launcher options (--nnodes 2 ...), then the vit-accel command
        i = 1
        while i < len(tok) and tok[i].startswith("--"):
            i += 1 if tok[i] == "--" else 2
        return tok[i:]
    if tok[0] == "make":               # the Makefile target's vit-accel line
        recipe = re.search(r"^%s:.*\n\t(.*)" % re.escape(tok[1]), (REPO / "Makefile").read_text(), re.M)
        line = recipe.group(1) if recipe else ""
        return tokens(line)[1:] if "vit-accel" in line else None
    return None


def needs_device(argv: List[str], tok: List[str]) -> bool:
    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "auto"
    multi_node = any(t in ("--nnodes", "--hosts", "--instances") for t in tok)
    return (backend in ("gpu", "ipu") and argv[0] != "plan") or multi_node or tok[0] == "launch/poprun.sh"


def subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert name in action.choices, f"no sub-command {name!r}; known: {sorted(action.choices)}"
    return action.choices[name]


COMMANDS = readme_commands()


def _id(item):
    return "L%d:%s" % (item[0], item[1][:60])


# ---------------------------------------------------------------------------------------
# Every command parses and names only existing keys
# ---------------------------------------------------------------------------------------

def test_readme_has_commands_of_every_kind():
    cmds = [c for _, c in COMMANDS]
    assert len(cmds) >= 20
    assert any("--backend gpu" in c for c in cmds) and any("--backend ipu" in c for c in cmds)
    assert any(c.startswith("torchrun") for c in cmds) and any("vit-accel make-shards" in c for c in cmds)


def test_not_run_list_names_only_readme_commands():
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for _, c in COMMANDS), f"NOT_RUN entry {prefix!r} is in no README command"


@pytest.mark.parametrize("line,cmd", COMMANDS, ids=[_id(c) for c in COMMANDS])
def test_readme_command_parses(line, cmd):
    tok = tokens(cmd)
    argv = vit_accel_argv(tok)
    if argv is None:
        assert not_run_reason(cmd), f"README line {line}: {cmd!r} is no vit-accel command and not in NOT_RUN"
        return
    if is_synopsis(tok):
        sub = subparser(argv[0])
        for t in argv[1:]:
            flag = t.strip("[]").split("=")[0]
            if flag.startswith("--"):
                assert flag in sub._option_string_actions, f"README line {line}: {argv[0]} has no {flag}"
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README line {line}: the CLI parser rejects {cmd!r}")
    if getattr(args, "config", None) and hasattr(args, "overrides"):
        backend = getattr(args, "backend", "auto")
        load_recipe(args.config, args.overrides, backends=[backend] if backend in ("cpu", "gpu", "ipu") else None)


# ---------------------------------------------------------------------------------------
# The commands a CPU can run, run (scaled down)
# ---------------------------------------------------------------------------------------

def _runnable() -> List[Tuple[int, str]]:
    out = []
    for line, cmd in COMMANDS:
        tok = tokens(cmd)
        argv = vit_accel_argv(tok)
        if argv is None or not_run_reason(cmd) or is_synopsis(tok) or needs_device(argv, tok):
            continue
        out.append((line, cmd))
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working directory holding the inputs README commands name (photos/, labels.csv, CKPT...)."""
    from PIL import Image

    from vit_accel.checkpoints import save_checkpoint
    from vit_accel.model import create_vit

    ws = tmp_path_factory.mktemp("readme")
    rows = []
    for c, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        (ws / "photos" / f"class{c}").mkdir(parents=True)
        for i in range(550):  # 2 shards of --samples-per-shard 1000, as bench-data --workers 2 needs
            p = ws / "photos" / f"class{c}" / f"{i}.jpg"
            Image.new("RGB", (48, 40), tuple(v + i % 50 for v in color)).save(p, quality=90)
            rows.append(f"{p},{c}")
    (ws / "labels.csv").write_text("\n".join(rows) + "\n")
    model = create_vit("vit-ti16", img_size=32, patch_size=4, depth=1, num_classes=10)  # class token: converts to hf
    save_checkpoint(model, str(ws / "ckpt.safetensors"), "vit-accel")
    return ws


def _argv_for_run(cmd: str, ws: Path) -> List[str]:
    for old, new in SUBSTITUTE.items():
        cmd = cmd.replace(old, new)
    tok = tokens(cmd)
    argv = vit_accel_argv(tok)
    runs = sorted(glob.glob(str(ws / "runs" / "*")))
    places = {"CKPT": str(ws / "ckpt.safetensors"), "SRC": str(ws / "ckpt.safetensors"), "DST": str(ws / "converted"),
              "RUN_DIR": runs[-1] if runs else "RUN_DIR"}
    argv = [places.get(a, a) for a in argv]
    argv = [sorted(glob.glob(str(ws / a)))[-1] if "*" in a and glob.glob(str(ws / a)) else a for a in argv]
    if argv[0] in ("train", "eval") and "--config" in argv:
        argv += [x for s in SCALE for x in ("--set", s)]
        argv += ["--no-progress"] if argv[0] == "train" else []
    if tok[0] == "torchrun":
        from test_zero import _free_port

        launcher = tok[1:tok.index("-m")]
        return [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())] + launcher + ["-m", "vit_accel"] + argv
    return [sys.executable, "-m", "vit_accel"] + argv


@pytest.mark.slow
def test_readme_cpu_commands_run(workspace):
    from test_zero import _env

    cmds = _runnable()
    assert any(c.startswith("torchrun") for _, c in cmds) and any("eval" in c for _, c in cmds)
    for line, cmd in cmds:
        argv = _argv_for_run(cmd, workspace)
        p = subprocess.run(argv, cwd=workspace, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README line {line}: {cmd}\n{' '.join(argv)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        assert "Traceback" not in p.stderr, f"README line {line}: {cmd}\n{p.stderr[-3000:]}"
        if cmd.startswith("torchrun"):   # the recipe's global batch, reached on this many processes
            nproc = tokens(cmd)[tokens(cmd).index("--nproc_per_node") + 1]
            assert re.search(r"batch: global \d+ = micro-batch \d+ x accumulation \d+ x %s process" % nproc,
                             p.stdout), p.stdout
