"""Hypothesis profiles for the fuzz tests.

``ci`` (the default) is bounded and reproducible: ~200 examples per target, derandomized, no
example database written. ``campaign`` is the longer local run, random and remembering what it
found in ``.hypothesis/``::

    HYPOTHESIS_PROFILE=campaign BEDSIDE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/fuzz
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from pydicom import config

from services.gateway.dicom.parsing import read_leniently

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci", max_examples=int(os.environ.get("BEDSIDE_FUZZ_EXAMPLES", "200")), derandomize=True,
    database=None, deadline=2000, suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile(
    "campaign", max_examples=int(os.environ.get("BEDSIDE_FUZZ_EXAMPLES", "5000")),
    deadline=2000, suppress_health_check=_SLOW_OK, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="package")
def lenient_pydicom() -> Iterator[None]:
    """As the gateway runs: values are not validated when read (read_leniently), and the
    mutations the fuzzers write would otherwise warn on every example."""
    saved = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    read_leniently()
    config.settings.writing_validation_mode = config.IGNORE
    yield
    config.settings.reading_validation_mode, config.settings.writing_validation_mode = saved
