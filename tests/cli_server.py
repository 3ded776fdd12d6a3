"""Runs `python -m vit_accel ARGV` commands for a test, each in a fork of this process.

Every command a test runs as `python -m vit_accel ...` pays 2-3 s of CPU to import torch and
the package before it does anything; a test that runs twenty commands pays a minute. This
process imports them once (nothing runs: no thread pool, no file, no device) and forks one
child per command, which sets its working directory, sends its stdout and stderr to files and
runs the package's `__main__` as `python -m` does (sys.argv, sys.path[0] = the working
directory); the exit status comes back as the command's.

Protocol, one JSON object per line: the test writes {"argv", "cwd", "stdout", "stderr",
"timeout"}; this process answers {"returncode", "timed_out"}. A command past its timeout is
killed (SIGKILL) and answers returncode -9. End of input ends the server.
"""
import importlib
import json
import os
import runpy
import signal
import sys
import time

# What the commands import anyway: loaded here, before any fork, so no child loads it again.
PRELOAD = ("torch", "torchvision", "PIL.Image", "numpy", "safetensors.torch", "yaml", "vit_accel.cli",
           "vit_accel.engine.trainer", "vit_accel.checkpoints", "vit_accel.data", "matplotlib.pyplot", "timm")


def preload() -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # the command that needs it will say so itself
            pass


def child(request: dict) -> None:
    """In the forked child: become `python -m vit_accel ARGV` in request's folder; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(request["cwd"])
        sys.path[0] = os.getcwd()
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the requests stay the server's
        os.close(null)
        sys.argv = [sys.executable] + list(request["argv"])
        try:
            runpy.run_module("vit_accel", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # as the interpreter ends: an int is the status, anything else is printed (1)
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
    except BaseException:  # noqa: B902 - a traceback on the command's stderr, as the interpreter prints it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve() -> None:
    preload()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        deadline, timed_out = time.monotonic() + float(request.get("timeout", 600)), False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
            time.sleep(0.02)
        rc = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"returncode": rc, "timed_out": timed_out}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
