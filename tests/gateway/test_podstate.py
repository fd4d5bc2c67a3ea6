"""The pod's shared limits: two ``PodState`` handles on one file stand for two gateway
processes of a pod (the integration test tests/integration/test_processes.py runs real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.security.connections import ADMIT, DROP, REFUSE, SourceCounts
from services.gateway.security.podstate import PodState
from services.gateway.security.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_bucket_per_key_for_the_whole_pod(tmp_path: Path) -> None:
    clock = Clock()
    a, b = PodState(tmp_path, 0, clock), PodState(tmp_path, 1, clock)
    la = RateLimiter(2.0, 3, clock=clock, shared=a)
    lb = RateLimiter(2.0, 3, clock=clock, shared=b)
    assert [la.take("key:x"), lb.take("key:x"), la.take("key:x")] == [0.0, 0.0, 0.0]
    assert lb.take("key:x") == pytest.approx(0.5)  # the burst of 3 is spent, pod-wide
    assert la.take("key:y") == 0.0  # another key, its own bucket
    clock.now += 0.5
    assert lb.take("key:x") == 0.0
    assert la.take("key:x") == pytest.approx(0.5)


def test_holds_count_across_processes_and_a_dead_process_gives_its_back(
        tmp_path: Path) -> None:
    a, b = PodState(tmp_path, 0), PodState(tmp_path, 1)
    assert a.hold("ae:CT", 2) is None and b.hold("ae:CT", 2) is None
    assert a.hold("ae:CT", 2) == 2  # refused: the pod holds 2
    assert b.hold("ae:MR", 2) is None
    b.release("ae:CT")
    assert a.hold("ae:CT", 2) is None
    assert a.held("ae:CT") == 2
    PodState.release_process(tmp_path, 0)  # process 0 died holding both of its CT holds
    assert a.held("ae:CT") == 0 and a.held("ae:MR") == 1
    restarted = PodState(tmp_path, 1)  # a new process of index 1 starts from nothing held
    assert restarted.held("ae:MR") == 0


def test_connections_per_source_are_capped_per_pod_and_a_dead_process_gives_its_back(
        tmp_path: Path) -> None:
    """Two processes' ``SourceCounts`` on one pod state: the cap is the pod's, not each one's."""
    a = SourceCounts(2, PodState(tmp_path, 0))
    b = SourceCounts(2, PodState(tmp_path, 1))
    assert [a.open("10.0.0.7"), b.open("10.0.0.7")] == [ADMIT, ADMIT]
    assert b.open("10.0.0.7") == REFUSE  # the third from one address, whichever process
    assert a.open("10.0.0.8") == ADMIT  # another address has its own count
    assert [a.open("10.0.0.7"), b.open("10.0.0.7")] == [REFUSE, DROP]  # beyond twice the cap
    assert a.admitted("10.0.0.7") == b.admitted("10.0.0.7") == 2
    b.close("10.0.0.7", REFUSE)
    b.close("10.0.0.7", ADMIT)
    assert b.open("10.0.0.7") == ADMIT
    assert a.open("10.0.0.7") == REFUSE
    PodState.release_process(tmp_path, 0)  # process 0 died (kill -9) holding its connections
    assert b.admitted("10.0.0.7") == 1
    assert [a.open("10.0.0.7"), b.open("10.0.0.7")] == [ADMIT, REFUSE]
