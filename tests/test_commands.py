"""The warm-forkserver runner (tests/commands.py) behaves as `subprocess.run` does for the same command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.commands import run_command, start_command

SCRIPT = """
import atexit, os, subprocess, sys
atexit.register(lambda: print("atexit ran", flush=True))
print("out", os.getcwd() == sys.argv[1], os.environ.get("LMLAB_PROBE"))
subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child err\\\\n')"])
print("err", file=sys.stderr)
if sys.argv[2] == "raise":
    raise RuntimeError("boom")
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize("ending", ["0", "3", "raise"])
def test_a_forked_command_matches_a_fresh_process(tmp_path, ending):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    args = [sys.executable, str(script), str(tmp_path), ending]
    env = {"LMLAB_PROBE": "seen", "PATH": "/usr/bin:/bin"}
    fresh = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    forked = run_command(args, cwd=tmp_path, timeout=60, env=env)
    assert forked.stdout == fresh.stdout == "out True seen\natexit ran\n"
    assert forked.returncode == fresh.returncode == {"0": 0, "3": 3, "raise": 1}[ending]
    assert forked.stderr.splitlines()[:2] == fresh.stderr.splitlines()[:2] == ["child err", "err"]
    assert ("RuntimeError: boom" in forked.stderr) == ("RuntimeError: boom" in fresh.stderr) == (ending == "raise")


def test_a_started_command_can_be_killed_mid_way(tmp_path):
    marker = tmp_path / "started"
    code = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"
    script = tmp_path / "sleeper.py"
    script.write_text(code)
    process = start_command([sys.executable, str(script)], cwd=tmp_path)
    while not marker.exists():
        assert process.poll() is None
    process.kill()
    assert process.wait(timeout=30) == -9
