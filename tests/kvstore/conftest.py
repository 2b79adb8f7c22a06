"""Fixtures for the KV storage tests (a real redis-server is ``tests/conftest.py``'s)."""

from __future__ import annotations

import resource
import signal

import pytest


@pytest.fixture
def file_size_limit():
    """Set RLIMIT_FSIZE (the kernel then refuses writes past it: EFBIG, as a full disk refuses
    with ENOSPC); restored afterwards."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, old_limit[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)
