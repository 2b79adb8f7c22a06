"""Fixtures for frontend tests: `tokenmill serve` processes over the tiny model directory
(``tests/conftest.py``) on free loopback ports, shared by the session. The process and
in-process server helpers are in ``helpers.procs`` and ``helpers.servers``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers.procs import ServerProcess, running_server


@pytest.fixture(scope="session")
def echo_server(tiny_model_dir) -> Iterator[ServerProcess]:
    """Echo engine (deterministic text: the prompt echoed back) served as "tiny"."""
    with running_server(
        "--model",
        str(tiny_model_dir),
        "--engine",
        "echo",
        "--served-model-name",
        "tiny",
        "--max-body-bytes",
        str(1 << 20),
    ) as server:
        yield server


@pytest.fixture(scope="session")
def real_server(tiny_model_dir) -> Iterator[ServerProcess]:
    """The real engine over the tiny llama, with an API key."""
    with running_server(
        "--model",
        str(tiny_model_dir),
        "--engine",
        "real",
        "--api-key",
        "sekret",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    ) as server:
        yield server
