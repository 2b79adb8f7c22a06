"""Fixtures shared by the engine tests. ``TOKENMILL_TEST_DEVICE=cuda`` runs the tests that
exercise device code paths on the GPU (``helpers.tiny_models.TEST_DEVICE``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import TEST_DEVICE


def pytest_configure(config) -> None:
    if torch.device(TEST_DEVICE).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"TOKENMILL_TEST_DEVICE={TEST_DEVICE} but CUDA is not available")


def pytest_report_header(config) -> str:
    return f"tokenmill engine test device: {TEST_DEVICE}"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every engine test runs torch on one thread (the machine's cores are shared; no engine
    test measures threading); the previous count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Callable[[str], Path]:
    """Here the name is the root conftest's ``family -> directory`` factory (the engine tests
    ask for several families; elsewhere ``tiny_model_dir`` is the llama3 directory)."""
    return tiny_model_factory
