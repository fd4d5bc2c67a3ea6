"""The supervisor with real spawned worker processes: a worker killed with SIGKILL is
restarted under its index (after its clean-up ran), SIGTERM stops every worker, and a worker's
fatal start ends the group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

from services.supervisor import FATAL, Supervisor


def _worker(folder: Path, index: int) -> None:
    """Writes its pid, then waits for SIGTERM (which it writes down on the way out)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    (folder / f"{index}.{os.getpid()}.pid").write_text("")
    stop.wait(60)
    (folder / f"{index}.{os.getpid()}.stopped").write_text("")


def _failing(index: int) -> None:
    sys.exit(FATAL)


def _pids(folder: Path, index: int) -> list[int]:
    return [int(p.name.split(".")[1]) for p in folder.glob(f"{index}.*.pid")]


def _wait(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _killed_worker_scenario(folder: Path) -> dict[str, object]:
    """Runs in a process of its own (``python -c``): it sends SIGTERM to itself, which the
    test process must not receive (the suite loads the Helm SDK's Go runtime, whose signal
    handling crashed the test process when a signal was sent to it)."""
    ended: list[tuple[int, int]] = []
    sup = Supervisor(partial(_worker, folder), 2, "w",
                     on_exit=lambda index, pid: ended.append((index, pid)), grace_s=20,
                     backoff_s=0.1)
    seen: dict[str, object] = {}

    def drive() -> None:
        _wait(lambda: len(_pids(folder, 0)) == 1 and len(_pids(folder, 1)) == 1)
        (first,) = _pids(folder, 1)
        os.kill(first, signal.SIGKILL)
        _wait(lambda: len(_pids(folder, 1)) == 2)  # a new process under index 1
        seen["ended_before_restart"] = list(ended)
        seen["killed"] = first
        os.kill(os.getpid(), signal.SIGTERM)  # what Kubernetes sends the supervisor

    driver = threading.Thread(target=drive)
    driver.start()
    seen["status"] = sup.run()
    driver.join()
    seen["restarts"] = sup.restarts
    seen["ended"] = ended
    return seen


def test_a_killed_worker_is_restarted_and_sigterm_stops_all(tmp_path: Path) -> None:
    code = ("import json, sys; from pathlib import Path; "
            "from tests.services.test_supervisor import _killed_worker_scenario as run; "
            "print(json.dumps(run(Path(sys.argv[1]))))")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    first = seen["killed"]
    assert seen["ended_before_restart"] == [[1, first]]  # its clean-up ran before the restart
    assert seen["status"] == 0 and seen["restarts"] == 1
    live = [p for i in (0, 1) for p in _pids(tmp_path, i) if p != first]
    assert len(live) == 2
    for pid in live:  # both stopped through their SIGTERM handler (drained), not killed
        assert list(tmp_path.glob(f"*.{pid}.stopped"))
    assert sorted(i for i, _ in seen["ended"]) == [0, 1, 1]


def test_a_worker_that_cannot_start_stops_the_group() -> None:
    assert Supervisor(_failing, 2, "w", grace_s=5).run() == FATAL
