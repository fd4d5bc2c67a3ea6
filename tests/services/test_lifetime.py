"""CPUs given to the process (cgroup quota and affinity; fake cgroup trees), and a child
that dies with its parent (real processes), set up without a symbol look-up between fork and
exec."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from services.lifetime import cpus_given

AFFINITY = len(os.sched_getaffinity(0))


def test_cpus_given_follows_the_cgroup_v2_quota_rounded_up_within_affinity_fake_cgroup(
        tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus_given(tmp_path) == min(AFFINITY, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpus_given(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus_given(tmp_path) == AFFINITY


def test_cpus_given_reads_cgroup_v1_and_no_cgroup_fake_cgroup(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus_given(tmp_path) == 1
    assert cpus_given(tmp_path / "missing") == AFFINITY


_PARENT = """
import subprocess, sys, os, signal
from functools import partial
from services.lifetime import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True,
                         preexec_fn=partial(die_with_parent, signal.SIGKILL, os.getpid()))
print(child.pid, flush=True)
time_to_die = sys.stdin.readline()
"""


def test_a_child_in_its_own_session_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive while its parent is
    parent.kill()
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        state = Path(f"/proc/{child}/stat").read_text().split(") ", 1)[1][:1]
        if state == "Z":  # dead, waiting for init to reap it
            break
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


_READ_DEATH_SIGNAL = """
import ctypes
value = ctypes.c_int()
assert ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
print(value.value)
"""


def test_the_preexec_function_looks_no_symbol_up_between_fork_and_exec(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """dlopen in the forked child can hang on a lock another thread held at the fork: the
    child must only call what the parent resolved. With ctypes.CDLL made to fail (in the
    parent, so in the fork too), the child still starts, its death signal set."""
    from services.lifetime import die_with_parent

    def no_dlopen(*args: object, **kwargs: object) -> None:
        raise AssertionError("ctypes.CDLL called between fork and exec")

    monkeypatch.setattr(ctypes, "CDLL", no_dlopen)
    child = subprocess.run(
        [sys.executable, "-c", _READ_DEATH_SIGNAL], capture_output=True, text=True,
        timeout=60, preexec_fn=partial(die_with_parent, signal.SIGUSR1, os.getpid()))
    monkeypatch.undo()
    assert child.returncode == 0, child.stderr
    assert int(child.stdout) == signal.SIGUSR1
