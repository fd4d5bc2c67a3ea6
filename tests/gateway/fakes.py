"""Test doubles for the Triton edge (unit tests only; integration tests use a real Triton)."""

from __future__ import annotations

import numpy as np

from services.gateway.errors import InferenceFailed, Unavailable


class FakeInferer:
    """Returns mean-of-input logits; can be told to be unavailable for the next N calls."""

    model = "tiny-cxr"

    def __init__(self, unavailable_calls: int = 0) -> None:
        self.unavailable_calls = unavailable_calls
        self.fail_permanently = False
        self.crash_next = False
        self.calls = 0
        self.is_ready = True

    def ready(self) -> bool:
        return self.is_ready

    def close(self) -> None:
        pass

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.crash_next:
            self.crash_next = False
            raise RuntimeError("simulated bug")
        if self.fail_permanently:
            raise InferenceFailed("fake model error", "triton_error")
        if self.unavailable_calls > 0:
            self.unavailable_calls -= 1
            raise Unavailable("fake triton down", "triton_unavailable")
        return batch.reshape(batch.shape[0], -1).mean(axis=1, keepdims=True)
