"""Fixtures shared by the engine tests. ``TOKENMILL_TEST_DEVICE=cuda`` runs the tests that
exercise device code paths on the GPU (``tiny_models.TEST_DEVICE``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import TEST_DEVICE, make_tiny_hf_model


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
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``family -> directory`` of ``make_tiny_hf_model(family)`` with default options, built
    once per session and shared by every test that asks: tests must only read it."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny_hf_model(tmp_path_factory.mktemp(family), family)
        return built[family]

    return get
