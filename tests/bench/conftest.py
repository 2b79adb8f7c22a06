"""Fixtures for the bench tests; the fake server itself is in fake_openai_server.py."""

from __future__ import annotations

import pytest
from fake_openai_server import FakeOpenAIServer


@pytest.fixture
async def fake_server():
    """Factory: ``await fake_server(script_for, metrics_text=None)`` -> a started server."""
    servers: list[FakeOpenAIServer] = []

    async def make(script_for, metrics_text=None) -> FakeOpenAIServer:
        server = FakeOpenAIServer(script_for, metrics_text)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()
