"""Fixtures for multi-process tests: the tiny model, its tokenizer, a real nats-server on a
free loopback port per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_procs import make_tiny_hf_model

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.runtime.nats_server import NatsServer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("model"), "llama3")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_model_dir)


@pytest.fixture
def nats_server():
    server = NatsServer().start()
    yield server
    server.stop()
