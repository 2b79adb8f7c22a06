"""Structured output across processes (``serve --workers 2``, the real engine over the tiny
llama): the constraint crosses the worker wire, and a request whose worker is killed mid-
stream is migrated with its grammar replayed, so its output is the uninterrupted one and
still validates."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import jsonschema
import pytest
from helpers.procs import Serve

SCHEMA = {
    "type": "object",
    "properties": {
        "digits": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 40,
            "maxItems": 40,
        }
    },
    "required": ["digits"],
    "additionalProperties": False,
}
BODY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "digits"}],
    "max_tokens": 230,
    "temperature": 0.0,
    "stream": True,
    "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": SCHEMA}},
}


async def _stream(client: httpx.AsyncClient, url: str, started: asyncio.Event) -> tuple[str, str]:
    text, finish, chunks = "", "", 0
    async with client.stream("POST", url + "/chat/completions", json=BODY) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
                chunks += 1
                if chunks >= 3:
                    started.set()
    return text, finish


@pytest.mark.slow
async def test_kill9_mid_stream_keeps_the_grammar_state(nats_server, tiny_model_dir):
    serve = Serve(
        tiny_model_dir, 2, "--nats", nats_server.url, "--engine", "real", "--dtype", "fp32"
    )
    serve.wait_ready()
    try:
        async with httpx.AsyncClient(timeout=120.0) as client:
            reference, finish = await _stream(client, serve.url, asyncio.Event())
            assert finish == "stop", reference
            jsonschema.validate(json.loads(reference), SCHEMA)  # across the process boundary
            events = [asyncio.Event() for _ in range(4)]
            tasks = [asyncio.create_task(_stream(client, serve.url, e)) for e in events]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            os.kill(serve.worker_pids[0], signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        serve.stop()
    assert "".join(serve.output).count("migrating after") >= 1
    for text, finish in results:
        assert finish == "stop" and text == reference
        jsonschema.validate(json.loads(text), SCHEMA)
