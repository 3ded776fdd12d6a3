"""The README is a contract: every command it shows is found, and parsed or run.

Commands are discovered, not listed, so a new README command is checked without touching this file:
every line of its code blocks (fenced and indented), and every inline code span in prose and tables
(recipe tables' run column, `vit-accel eval --checkpoint CKPT --ema` in a sentence) whose first word is
a program of this project or one it documents (vit-accel, python -m vit_accel, torchrun, the launch/
scripts, sbatch, make, pip, pytest, python tools/...). A mention without arguments (`vit-accel train`)
is parsed like any other.

How each is checked. vit-accel commands parse with the real CLI parser and name only existing recipe
keys; synopsis forms (`[--json]`, `{a,b}`, `...`) are checked flag by flag; those a CPU can run run here,
scaled down with --set (code blocks). Launchers: every option is one the script handles, then the
vit-accel command after it is checked; poprun.sh prints its command with --dry-run. sbatch: its options
are the batch script's own #SBATCH directives. make: the Makefile has the target. pip: the extras
exist. pytest: the selection collects tests. python tools/X.py: the tool's parser takes the flags.
NOT_RUN is the short list of code-block commands that are not run, each with its reason; programs
that are not ours (EXTERNAL) are shown, never parsed.
"""
import argparse
import functools
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from vit_accel.cli import build_parser
from vit_accel.config import list_configs, load_recipe

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

# Commands (by prefix) that are not run here, and why. Everything else that needs no GPU or IPU runs.
NOT_RUN = {
    "make test": "the suite this test belongs to",
    "vit-accel make-shards --source imagenet": "needs the ImageNet tree on disk (parsed here)",
    "vit-accel bench-data --corpus": "a benchmark of minutes (parsed here; tests/test_bench_data.py runs bench-data "
                                     "on 48 photos)",
    "vit-accel eval --config timm-vit-b16-r50-384": "needs timm's published weights file and ImageNet shards (parsed "
                                                    "here; tests/test_converted_rows.py runs every row's eval on "
                                                    "tiny shards)",
}
# Programs of other projects a README code block may show (a cluster's scheduler, the shell): not ours to check
EXTERNAL = ("kill", "scancel", "scontrol", "squeue", "srun", "nvidia-smi", "gc-info", "export", "source", "cd", "ls",
            "cat", "tar", "curl", "aws", "gsutil", "git", "docker")
OURS = ("vit-accel", "python", "python3", "torchrun", "sbatch", "make", "pip", "pytest")
# Scaled-down runs (fewer steps, one block; the batch arithmetic stays the recipe's): the README's
# checkpoint of the full 600-step default is this run's last one
SCALE_STEPS = 4
SCALE = ["schedule.total_steps=%d" % SCALE_STEPS, "schedule.warmup_steps=1", "model.depth=1", "train.eval_every=0",
         "train.checkpoint_every=0", "train.log_every=2", "data.workers=1"]
SUBSTITUTE = {"step_0000600.pt": "step_%07d.pt" % SCALE_STEPS}
# `finetune` takes its model from the pretrained file (no model.depth) and counts in epochs: a tenth of one
SCALE_BY_RECIPE = {"finetune": ["schedule.epochs=0.1", "schedule.warmup_epochs=0.05", "train.log_every=2",
                                "data.workers=1"]}


# ---------------------------------------------------------------------------------------
# Finding the commands
# ---------------------------------------------------------------------------------------

def code_blocks(text: str) -> List[Tuple[int, List[str], int, int]]:
    """(first content line, lines, first line, last line) of every fenced (```) and indented (4 spaces)
    code block; line numbers from 1, the fences included in the block's span."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            blocks.append((i + 2, lines[i + 1:j], i + 1, j + 1))
            i = j + 1
        elif line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append((i + 1, [ln[4:] for ln in lines[i:j]], i + 1, j))
            i = j
        else:
            i += 1
    return blocks


def block_commands(text: str) -> List[Tuple[int, str]]:
    """(line number, command) of code blocks: continuation lines joined, output lines (#...) and prompts
    (node0$) dropped."""
    out = []
    for start, lines, _, _ in code_blocks(text):
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


def program(first_word: str) -> Optional[str]:
    """The kind of program a command starts with, or None when it is no command of ours."""
    if first_word in OURS:
        return first_word
    if first_word.startswith(("launch/", "tools/")):
        return first_word.split("/")[0]
    return None


def inline_commands(text: str) -> List[Tuple[int, str]]:
    """(line number, command) of inline code spans outside code blocks that start with one of our programs."""
    lines = text.splitlines()
    for _, _, first, last in code_blocks(text):
        for k in range(first - 1, min(last, len(lines))):
            lines[k] = ""
    out, para, para_start = [], [], 0
    for n, line in enumerate(lines + [""], 1):
        if line.strip():
            para_start = para_start or n
            para.append(line)
            continue
        joined = "\n".join(para)
        for m in re.finditer(r"`([^`]+)`", joined):
            span = " ".join(m.group(1).split())
            words = span.split()
            if program(words[0]) and (len(words) > 1 or "/" in words[0]):
                out.append((para_start + joined[:m.start()].count("\n"), span))
        para, para_start = [], 0
    return out


def readme_commands() -> List[Tuple[int, str, str]]:
    """Every command of the README, (line, command, "block" or "inline"), in the order of its lines."""
    text = README.read_text()
    return sorted([(n, c, "block") for n, c in block_commands(text)] +
                  [(n, c, "inline") for n, c in inline_commands(text)])


def tokens(cmd: str) -> List[str]:
    return shlex.split(cmd, comments=True)


def is_synopsis(tok: List[str]) -> bool:
    return any(t == "..." or t.startswith(("[", "{")) or (t.endswith(("...", "...]")) and "=" not in t) or
               "{" in t and "," in t for t in tok)


def not_run_reason(cmd: str) -> Optional[str]:
    return next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)


def launcher_options(script: str) -> set:
    """The options a launch/ script's argument loop handles (its `case` patterns)."""
    text = (REPO / script).read_text()
    return {opt for pattern in re.findall(r"^\s*([-|a-z0-9]+)\)", text, re.M) for opt in pattern.split("|")
            if opt.startswith("--")}


def launcher_split(tok: List[str]) -> Tuple[List[str], List[str]]:
    """A launcher command's own options (``--nnodes 2``, ``--dry-run``) and the vit-accel command after them."""
    opts = launcher_options(tok[0])
    i = 1
    while i < len(tok) and tok[i].startswith("--"):
        if tok[i] == "--":
            i += 1
            break
        flag = tok[i]
        takes_value = i + 1 < len(tok) and not tok[i + 1].startswith("--") and flag in opts and flag != "--dry-run"
        i += 2 if takes_value else 1
    return tok[1:i], tok[i:]


def vit_accel_argv(tok: List[str]) -> Optional[List[str]]:
    """The `vit-accel` arguments of a command, whatever launches it; None for other programs."""
    if tok[0] == "vit-accel":
        return tok[1:]
    if "-m" in tok and tok[tok.index("-m") + 1:tok.index("-m") + 2] == ["vit_accel"]:
        return tok[tok.index("-m") + 2:]
    if tok[0] == "launch/poprun.sh" and not is_synopsis(tok):   # the script prints the command it would run
        env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))
        out = subprocess.run(["bash", str(REPO / tok[0]), "--dry-run"] + tok[1:], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return vit_accel_argv(shlex.split(out.stdout))
    if tok[0].startswith("launch/") and tok[0] != "launch/slurm.sbatch":
        return launcher_split(tok)[1]
    if tok[0] == "sbatch":              # sbatch [its options] launch/slurm.sbatch COMMAND ...
        script = next(i for i, t in enumerate(tok) if t.endswith(".sbatch"))
        return tok[script + 1:]
    if tok[0] == "make":               # the Makefile target's vit-accel line
        recipe = re.search(r"^%s:.*\n\t(.*)" % re.escape(tok[1]), (REPO / "Makefile").read_text(), re.M)
        line = recipe.group(1) if recipe else ""
        return tokens(line)[1:] if "vit-accel" in line else None
    return None


def needs_device(argv: List[str], tok: List[str]) -> bool:
    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "auto"
    multi_node = any(t in ("--nnodes", "--hosts", "--instances", "--hostfile") for t in tok)
    return (backend in ("gpu", "ipu") and argv[0] != "plan") or multi_node or tok[0] in ("launch/poprun.sh", "sbatch")


def subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert name in action.choices, f"no sub-command {name!r}; known: {sorted(action.choices)}"
    return action.choices[name]


COMMANDS = readme_commands()
BLOCK_COMMANDS = [(n, c) for n, c, where in COMMANDS if where == "block"]


def _id(item):
    return "L%d:%s" % (item[0], item[1][:60])


# ---------------------------------------------------------------------------------------
# Every command parses and names only existing keys
# ---------------------------------------------------------------------------------------

def test_readme_has_commands_of_every_kind():
    cmds = [c for _, c, _ in COMMANDS]
    assert len(cmds) >= 60 and len(BLOCK_COMMANDS) >= 30
    assert any("--backend gpu" in c for c in cmds) and any("--backend ipu" in c for c in cmds)
    assert any(c.startswith("torchrun") for c in cmds) and any("vit-accel make-shards" in c for c in cmds)
    # the ones in prose and recipe tables are found too
    for want in ("vit-accel eval --checkpoint CKPT --ema", "launch/deepspeed.sh --hostfile", "sbatch --nodes 2 launch/slurm.sbatch",
                 "python tools/bench_model_cpu.py", "pytest tests/bench/test_bench_ipu_feed.py",
                 "vit-accel train --backend {ipu,gpu,cpu} --config vit-b16-ft"):
        assert any(c.startswith(want) for c in cmds), want


def test_every_code_block_line_belongs_to_a_found_command():
    """Nothing in a code block is skipped silently: each line is a command, a continuation, an output line
    (#...) or blank, and the commands found are as many as the lines that start one."""
    starts = 0
    for _, lines, _, _ in code_blocks(README.read_text()):
        continued = False
        for line in lines:
            s = line.strip()
            if not continued and s and not s.startswith("#"):
                starts += 1
            continued = bool(s) and s.endswith("\\") and (continued or not s.startswith("#"))
    assert starts == len(BLOCK_COMMANDS)


def test_not_run_list_names_only_readme_commands():
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for _, c in BLOCK_COMMANDS), f"NOT_RUN entry {prefix!r} is in no README command"


def _known_key(key: str) -> bool:
    from vit_accel.config import Recipe

    section, _, name = key.partition(".")
    return hasattr(getattr(Recipe(), section, None), name) if name else False


def check_vit_accel(line: int, cmd: str, tok: List[str], argv: List[str], where: str) -> None:
    """The CLI parser takes it; recipe keys exist; a synopsis flag by flag."""
    if not argv or argv[0] == "...":                 # `python -m vit_accel ...`: the program alone
        return
    if is_synopsis(tok) or where == "inline":       # a synopsis, or a sentence's partial command: flag by flag
        sub = subparser(argv[0])
        for i, t in enumerate(argv[1:], 1):
            flag = t.strip("[]").split("=")[0]
            if flag.startswith("--"):
                assert flag in sub._option_string_actions, f"README line {line}: {argv[0]} has no {flag}"
                choices = sub._option_string_actions[flag].choices
                value = argv[i + 1].strip("[]{}") if i + 1 < len(argv) else ""
                if choices and value and not value.startswith("-") and value not in ("...", "N"):
                    for v in value.split(","):
                        assert v in choices, f"README line {line}: {flag} {v} is not one of {sorted(choices)}"
            if argv[i - 1] == "--set" and "=" in t:
                assert _known_key(t.split("=")[0]), f"README line {line}: no recipe key {t.split('=')[0]!r}"
            if argv[i - 1] == "--config" and not t.isupper():
                assert t in list_configs(), f"README line {line}: no recipe {t!r}"
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README line {line}: the CLI parser rejects {cmd!r}")
    if getattr(args, "config", None) and hasattr(args, "overrides"):
        backend = getattr(args, "backend", "auto")
        load_recipe(args.config, args.overrides, backends=[backend] if backend in ("cpu", "gpu", "ipu") else None)


def check_launcher(line: int, tok: List[str]) -> None:
    """A launch/ script: its options are ones its argument loop handles, the files it names exist."""
    script = REPO / tok[0]
    assert script.is_file(), f"README line {line}: no {tok[0]}"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    if tok[0] == "launch/slurm.sbatch":
        return
    opts, _ = launcher_split(tok)
    known = launcher_options(tok[0])
    for t in opts:
        if t.startswith("--") and t != "--":
            assert t in known, f"README line {line}: {tok[0]} has no option {t}; it handles {sorted(known)}"
        elif t.startswith(("launch/", "tools/", "configs/")):
            assert (REPO / t).exists(), f"README line {line}: no {t}"


def check_sbatch(line: int, tok: List[str]) -> None:
    """sbatch's options are ones the batch script sets itself (#SBATCH), the script is a launcher of ours."""
    script = next((t for t in tok if t.endswith(".sbatch")), None)
    assert script and (REPO / script).is_file(), f"README line {line}: no batch script in {' '.join(tok)}"
    directives = set(re.findall(r"^#SBATCH (--[a-z-]+)", (REPO / script).read_text(), re.M))
    for t in tok[1:tok.index(script)]:
        if t.startswith("--"):
            assert t.split("=")[0] in directives, f"README line {line}: {script} sets no {t} (#SBATCH {sorted(directives)})"
    check_launcher(line, [script])


def check_make(line: int, tok: List[str]) -> None:
    targets = set(re.findall(r"^([a-zA-Z0-9_-]+):", (REPO / "Makefile").read_text(), re.M))
    assert tok[1] in targets, f"README line {line}: the Makefile has no target {tok[1]!r}"


def check_pip(line: int, tok: List[str]) -> None:
    """pip install of this project: the extras it names exist."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = set(meta.get("optional-dependencies", {}))
    assert tok[1] == "install", f"README line {line}: {' '.join(tok)}"
    for t in tok[2:]:
        if t.startswith("-"):
            continue
        m = re.match(r"^(\.|%s)(\[(.+)\])?$" % re.escape(meta["name"]), t)
        assert m, f"README line {line}: pip installs {t!r}, not this project"
        if m.group(3):
            missing = set(m.group(3).split(",")) - extras
            assert not missing, f"README line {line}: pyproject.toml has no extra {sorted(missing)}; it has {sorted(extras)}"


def check_python(line: int, tok: List[str]) -> None:
    """python tools/X.py FLAGS: the tool's parser takes each flag; python -m M: the module is there."""
    if tok[1] == "-m":
        assert importlib.util.find_spec(tok[2]) is not None, f"README line {line}: no module {tok[2]}"
        if tok[2] == "pytest":
            check_pytest(line, ["pytest"] + tok[3:])
        return
    tool = REPO / tok[1]
    assert tool.is_file(), f"README line {line}: no {tok[1]}"
    flags = [t.split("=")[0] for t in tok[2:] if t.startswith("--")]
    if flags:
        out = subprocess.run([sys.executable, str(tool), "--help"], cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert out.returncode == 0, out.stderr[-2000:]
        for f in flags:
            assert re.search(r"(^|[\s,\[])%s\b" % re.escape(f), out.stdout), f"README line {line}: {tok[1]} has no {f}"


@functools.lru_cache(maxsize=None)
def _collect(args: Tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))


def check_pytest(line: int, tok: List[str]) -> None:
    """The selection collects tests (the paths exist, the marker selects some)."""
    out = _collect(tuple(tok[1:]))
    assert out.returncode == 0 and re.search(r"\d+(/\d+)? tests? collected", out.stdout), \
        f"README line {line}: {' '.join(tok)} collects nothing\n{out.stdout[-2000:]}{out.stderr[-2000:]}"


def check_tool_path(line: int, tok: List[str]) -> None:
    path = REPO / tok[0]
    assert path.is_file(), f"README line {line}: no {tok[0]}"
    if path.suffix == ".sh":
        assert subprocess.run(["bash", "-n", str(path)], timeout=30).returncode == 0


@pytest.mark.parametrize("line,cmd,where", COMMANDS, ids=["%s-%s" % (c[2], _id(c)) for c in COMMANDS])
def test_readme_command_parses(line, cmd, where):
    tok = tokens(cmd)
    kind = program(tok[0])
    if kind is None:
        assert tok[0] in EXTERNAL or not_run_reason(cmd), \
            f"README line {line}: {cmd!r} starts with no program this test knows (add it to EXTERNAL or NOT_RUN)"
        return
    if kind == "launch" and where == "inline":   # a mention in prose (`launch/poprun.sh --instances N`)
        check_launcher(line, tok)
        argv = launcher_split(tok)[1]
        if argv and argv[0] != "...":
            check_vit_accel(line, cmd, tok, argv, where)
        return
    argv = vit_accel_argv(tok)
    if kind == "launch":
        check_launcher(line, tok)
    elif kind == "sbatch":
        check_sbatch(line, tok)
    elif kind == "make":
        check_make(line, tok)
    elif kind == "pip":
        check_pip(line, tok)
        return
    elif kind == "pytest":
        check_pytest(line, tok)
        return
    elif kind == "tools":
        check_tool_path(line, tok)
        return
    elif kind in ("python", "python3") and argv is None:
        check_python(line, tok)
        return
    if argv is not None:
        check_vit_accel(line, cmd, tok, argv, where)
    else:
        assert kind == "make" or not_run_reason(cmd), f"README line {line}: {cmd!r} runs no vit-accel command"


# ---------------------------------------------------------------------------------------
# The commands a CPU can run, run (scaled down)
# ---------------------------------------------------------------------------------------

def _runnable() -> List[Tuple[int, str]]:
    out = []
    for line, cmd in BLOCK_COMMANDS:
        tok = tokens(cmd)
        argv = vit_accel_argv(tok)
        if argv is None or not_run_reason(cmd) or is_synopsis(tok) or needs_device(argv, tok):
            continue
        out.append((line, cmd))
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working directory holding the inputs README commands name (photos/, labels.csv, CKPT, a pretrained file...)."""
    from PIL import Image

    from vit_accel.checkpoints import save_checkpoint
    from vit_accel.model import create_vit

    ws = tmp_path_factory.mktemp("readme")
    rows = []
    for c, (name, color) in enumerate([("cat", (200, 30, 30)), ("dog", (30, 30, 200))]):
        (ws / "photos" / name).mkdir(parents=True)
        for i in range(600):  # 90% for training: 2 shards of --samples-per-shard 1000, as bench-data --workers 2 needs
            p = ws / "photos" / name / f"IMG_{i:04d}.jpg"
            Image.new("RGB", (48, 40), tuple(v + i % 50 for v in color)).save(p, quality=90)
            rows.append(f"{p},{c}")
    (ws / "labels.csv").write_text("\n".join(rows) + "\n")
    model = create_vit("vit-ti16", img_size=32, patch_size=4, depth=1, num_classes=10)  # class token: converts to hf
    save_checkpoint(model, str(ws / "ckpt.safetensors"), "vit-accel")
    # the pretrained file the photo commands name: a tiny stand-in in timm's format, another class count
    small = create_vit("vit-s16", img_size=32, patch_size=8, depth=1, num_classes=1000)
    save_checkpoint(small, str(ws / "vit_small_patch16_224.safetensors"), "timm")
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
        scale = SCALE_BY_RECIPE.get(argv[argv.index("--config") + 1], SCALE)
        argv += [x for s in scale for x in ("--set", s)]
        argv += ["--no-progress"] if argv[0] == "train" else []
    if tok[0] == "torchrun":
        from testkit import free_port

        launcher = tok[1:tok.index("-m")]
        return [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())] + launcher + ["-m", "vit_accel"] + argv
    return [sys.executable, "-m", "vit_accel"] + argv


class CliServer:
    """`python -m vit_accel ARGV` in a fork of one process that imported torch and the package once
    (tests/cli_server.py): the same entry point, arguments, folder and environment, without an
    interpreter start per command. Launchers (torchrun) still start their own processes."""

    def __init__(self, env: dict, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_server.py"))], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.count = 0

    def run(self, argv: List[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = (self.folder / f"cmd{self.count}.{s}" for s in ("out", "err"))
        request = dict(argv=argv, cwd=str(cwd), stdout=str(out), stderr=str(err), timeout=timeout)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "tests/cli_server.py ended (exit %s)" % self.proc.poll()
        answer = json.loads(line)
        assert not answer["timed_out"], f"timed out after {timeout} s: {argv}"
        return subprocess.CompletedProcess(argv, answer["returncode"], out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.mark.slow
def test_readme_cpu_commands_run(workspace, tmp_path):
    from test_zero import _env

    cmds = _runnable()
    assert any(c.startswith("torchrun") for _, c in cmds) and any("eval" in c for _, c in cmds)
    env = _env()
    server = CliServer(env, tmp_path)
    try:
        _run_commands(cmds, workspace, server, env)
    finally:
        server.close()
    assert server.count >= len(cmds) // 2, server.count  # most commands run in the server's forks


def _run_commands(cmds: List[Tuple[int, str]], workspace: Path, server: CliServer, env: dict) -> None:
    for line, cmd in cmds:
        argv = _argv_for_run(cmd, workspace)
        if argv[:3] == [sys.executable, "-m", "vit_accel"]:
            p = server.run(argv[3:], workspace, timeout=600)
        else:
            p = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README line {line}: {cmd}\n{' '.join(argv)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        assert "Traceback" not in p.stderr, f"README line {line}: {cmd}\n{p.stderr[-3000:]}"
        if cmd.startswith("torchrun"):   # the recipe's global batch, reached on this many processes
            nproc = tokens(cmd)[tokens(cmd).index("--nproc_per_node") + 1]
            assert re.search(r"batch: global \d+ = micro-batch \d+ x accumulation \d+ x %s process" % nproc,
                             p.stdout), p.stdout
