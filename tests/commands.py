"""Run lmlab's command-line scripts as real processes, without paying for their imports every time.

A fresh `python train.py` spends about 6 of its 7 seconds on a 2-core machine importing torch,
Lightning (which imports torchmetrics, and through it transformers and scipy) and Hydra. The
suite starts dozens of commands, so `run_command` forks each one from a forkserver that imported
those libraries once. The child is still its own process: its own working directory, environment,
file descriptors 1 and 2 (so a process it starts writes there too), `sys.argv`, exit code, and
atexit handlers; only the third-party modules above are already in `sys.modules`. lmlab's own
modules are not preloaded, so every command imports them afresh, as `python train.py` does.
The forkserver never runs a torch op, so forking it is safe (forking a process that has used
OpenMP threads is not).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

PRELOAD = ["torch", "pytorch_lightning", "hydra", "omegaconf", "torchmetrics", "tokenizers"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _command_main(argv: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the forked child: become `python ARGV...` (a script, or `-m module`) and exit as it would."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115 (the process's own streams)
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
    sys.stdin = open(os.devnull)  # noqa: SIM115
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = str(Path(cwd, argv[0]))
            sys.argv = [argv[0], *argv[1:]]
            sys.path.insert(0, str(Path(script).parent))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int) and stop.code is not None:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class StartedCommand:
    """The part of `subprocess.Popen` the tests use, for a command forked from the warm forkserver:
    its output goes to files, read back by `communicate`."""

    def __init__(self, args: list[str], cwd: Path | str | None = None, env: dict[str, str] | None = None) -> None:
        if args[0] != sys.executable:
            raise ValueError("commands run [sys.executable, script or -m module, ...]")
        self.args, self.returncode = args, None
        self._folder = tempfile.TemporaryDirectory(prefix="lmlab-command-")
        self._stdout, self._stderr = Path(self._folder.name, "stdout"), Path(self._folder.name, "stderr")
        self._stdout.touch(), self._stderr.touch()
        argv, folder = [str(a) for a in args[1:]], str(cwd or os.getcwd())
        files = (str(self._stdout), str(self._stderr))
        environment = dict(os.environ if env is None else env)
        self._process = _CONTEXT.Process(target=_command_main, args=(argv, folder, environment, *files))
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self._process.kill()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        output = self._stdout.read_text(), self._stderr.read_text()
        self._folder.cleanup()
        return output


def start_command(args: list[str], *, cwd: Path | str | None = None) -> StartedCommand:
    """`subprocess.Popen(args, cwd=cwd)` for `args = [sys.executable, ...]`, forked from the warm forkserver."""
    return StartedCommand(args, cwd)


def run_command(
    args: list[str],
    *,
    cwd: Path | str | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """What `subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)` returns
    for `args = [sys.executable, script or -m module, ...]`, the process forked from the warm forkserver."""
    process = StartedCommand(args, cwd, env)
    try:
        stdout, stderr = process.communicate(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
