"""Tying a child process's life to its parent's, and how many CPUs this process is given.

A child started by Bedside (a gateway process of a pod, the bundled tritonserver) must not
outlive the process that started it: killed with SIGKILL, a parent runs no clean-up, and a
child left behind keeps its ports and its share of the machine. Linux's
``PR_SET_PDEATHSIG`` has the kernel signal the child when its parent dies, whatever the cause;
``die_with_parent`` sets it in the child (first thing in a spawned process, or as a
``subprocess.Popen`` ``preexec_fn``) and closes the race of a parent gone before it was set.
The signal is sent when the *thread* that started the child ends, so children are started
from the main thread.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
from pathlib import Path

LOG = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_CGROUP = Path("/sys/fs/cgroup")
# Resolved once, in the parent: a ``preexec_fn`` runs between fork and exec, where looking a
# symbol up (dlopen's locks, held by some other thread at the fork) could hang. Its argument
# and result types are set here too, so that a call converts five ints and nothing else.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PRCTL.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_PRCTL.restype = ctypes.c_int


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies. ``parent_pid``: the
    parent as the caller knew it; when this process has already been re-parented (the parent
    died before this call), ``sig`` is sent at once. Safe in a ``preexec_fn`` (no allocation
    beyond the ctypes call, no lock, no symbol looked up: ``_PRCTL`` was resolved on import)."""
    if _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def _quota_cpus(root: Path) -> float | None:
    """The cgroup CPU quota in CPUs (a Kubernetes CPU limit), or None when unlimited."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cpus_given(cgroup_root: Path = _CGROUP) -> int:
    """CPUs this process may use: its CPU affinity, capped by the cgroup's CPU quota (rounded
    up: a pod limited to 1.5 CPUs runs 2 processes); at least 1."""
    affinity = len(os.sched_getaffinity(0))
    quota = _quota_cpus(cgroup_root)
    cpus = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, cpus)
