"""Shared pytest setup: GPU-only tests are skipped where CUDA is unavailable (CI is CPU-only); hypothesis draws
the same examples on every run (profile ``repro``: a landing must not depend on the draw), and
``HYPOTHESIS_PROFILE=explore`` draws fresh ones to hunt for new counterexamples."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("repro", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repro"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def log_records():
    """Records of the ``bft_megatron`` loggers in this process (they do not propagate to caplog)."""
    from tests.data_fixtures import logged

    with logged(logging.NOTSET) as records:
        yield records
