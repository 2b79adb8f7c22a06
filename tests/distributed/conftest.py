"""Fixtures for multi-process tests: the tiny model's tokenizer (the model directory and a
real nats-server per test come from ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.engine.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_model_dir)
