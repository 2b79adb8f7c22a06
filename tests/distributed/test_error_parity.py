"""The same bad requests get the same answer, status and error JSON, from ``tokenmill serve``
(one process, in-process runtime: errors pass as objects) and ``tokenmill serve --workers 2``
(worker processes over NATS and the TCP request plane: errors cross as registered codes).
Both servers run once for the module, on free loopback ports, over the mocker. A duplicate
request id cannot be sent through the HTTP API (the frontend makes every id), so it is
driven at the worker level: an in-process worker against the worker processes, from a second
connection (the worker catches it) and from the same one (the request plane does)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from helpers.procs import Proc, free_port

from tokenmill.core.errors import DuplicateRequestError
from tokenmill.core.request import EngineRequest, RequestOutput
from tokenmill.core.sampling import SamplingParams
from tokenmill.frontend.errors import classify
from tokenmill.runtime.inprocess import InProcessRuntime
from tokenmill.runtime.nats_runtime import NatsRuntime
from tokenmill.runtime.nats_server import NatsServer
from tokenmill.worker.echo_engine import EchoConfig, EchoEngine
from tokenmill.worker.worker import Worker

CHAT, COMP = "/chat/completions", "/completions"
CONTEXT = 4096  # the mocker decodes ~6 ms a token: a long request stays in flight
MSG = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": MSG, "max_tokens": 2, **fields}


def comp(**fields) -> dict:
    return {"model": "tiny", "prompt": "hi", "max_tokens": 2, **fields}


BAD = {  # name: (path, body: a dict sent as JSON, or raw bytes), expected status
    "bad json": (CHAT, b'{"messages": [', 400),
    "unknown model": (CHAT, chat(model="gpt-9"), 404),
    "negative max_tokens": (CHAT, chat(max_tokens=-5), 400),
    "max_tokens string": (COMP, comp(max_tokens="x"), 400),
    "prompt over the context": (COMP, comp(prompt="word " * CONTEXT * 2), 400),
    "max_tokens over the context": (CHAT, chat(max_tokens=10 * CONTEXT), 400),
    "n too large": (CHAT, chat(n=10000), 400),
    "logit_bias key": (COMP, comp(logit_bias={"abc": 1}), 400),
    "logit_bias out of vocab": (COMP, comp(logit_bias={"999999": 1}), 400),
    "token id out of vocab": (COMP, comp(prompt=[1, 2, 10**6]), 400),
    "empty messages": (CHAT, chat(messages=[]), 400),
    "tools": (CHAT, chat(tools=[{"type": "function"}]), 400),
    "streamed bad request": (CHAT, chat(stream=True, temperature=-1), 400),
    "pinning without the flag": (COMP, comp(router={"worker_id": "w0"}), 400),
    "body too large": (COMP, comp(prompt="a" * 70_000), 413),
}


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    server = NatsServer().start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def servers(tiny_model_dir, nats_url) -> Iterator[dict[str, str]]:
    """{"serve": url, "serve --workers 2": url}, both started at once, stopped after."""
    common = (
        "--engine",
        "mocker",
        "--model",
        str(tiny_model_dir),
        "--served-model-name",
        "tiny",
        "--context-length",
        str(CONTEXT),
        "--max-body-bytes",
        "65536",
    )
    ports = {"serve": free_port(), "serve --workers 2": free_port()}
    extra = {"serve": (), "serve --workers 2": ("--workers", "2", "--nats", nats_url)}
    procs = {
        name: Proc("serve", "--port", str(port), *common, *extra[name])
        for name, port in ports.items()
    }
    try:
        for proc in procs.values():
            proc.wait_for("tokenmill: serving")
        yield {name: f"http://127.0.0.1:{port}/v1" for name, port in ports.items()}
    finally:
        codes = [proc.stop() for proc in procs.values()]
    assert codes == [0, 0]


def answer(url: str, path: str, body: dict | bytes) -> tuple[int, dict]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
    return r.status_code, r.json()


def test_both_servers_serve(servers):
    for url in servers.values():
        status, body = answer(url, COMP, comp())
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_gets_the_same_answer_from_both(servers, name):
    path, body, status = BAD[name]
    single, multi = (answer(url, path, body) for url in servers.values())
    assert single == multi
    assert single[0] == status and set(single[1]["error"]) == {"message", "type", "param", "code"}


def engine_request(request_id: str, max_tokens: int) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=list(range(10, 30)),
        params=SamplingParams(max_tokens=max_tokens),
    )


async def duplicate_answer(client, request_id: str, instance_id: str | None = None):
    """``classify`` of the error a second ``request_id`` gets while the first is in flight."""
    with pytest.raises(DuplicateRequestError) as info:
        await client.generate(engine_request(request_id, 4), request_id, instance_id).__anext__()
    return classify(info.value)


async def test_a_duplicate_request_id_gets_the_same_answer_in_process_and_across(nats_url, servers):
    runtime = InProcessRuntime()
    worker = Worker(EchoEngine(EchoConfig(token_delay_s=0.01)), runtime)
    await worker.start()
    local = runtime.client(worker.config.endpoint)
    first = local.generate(engine_request("dup", CONTEXT - 40), "dup")
    await first.__anext__()  # in flight
    expected = await duplicate_answer(local, "dup")
    await first.aclose()
    await worker.stop()

    a, b = [await NatsRuntime.connect(nats_url) for _ in range(2)]
    try:
        clients = [rt.client(worker.config.endpoint, RequestOutput) for rt in (a, b)]
        instance_id = (await clients[0].wait_for_instances(timeout_s=10))[0].instance_id
        await clients[1].wait_for_instances(timeout_s=10)
        first = clients[0].generate(engine_request("dup", CONTEXT - 40), "dup", instance_id)
        await first.__anext__()  # in flight on the worker process
        by_worker = await duplicate_answer(clients[1], "dup", instance_id)  # another connection
        by_plane = await duplicate_answer(clients[0], "dup", instance_id)  # the same one
        await first.aclose()
    finally:
        await asyncio.gather(a.shutdown(), b.shutdown())
    assert by_worker == by_plane == expected
    assert expected[:2] == (
        400,
        {
            "error": {
                "message": "request id 'dup' is already in flight",
                "type": "invalid_request_error",
                "param": "request_id",
                "code": "duplicate_request_id",
            }
        },
    )
