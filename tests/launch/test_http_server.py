"""The HTTP server settings of ``serve`` / ``frontend``: the event loop (``--event-loop``,
asyncio's by default; workers and routers default to uvloop) and how long an idle keep-alive
connection stays open (``--timeout-keep-alive``, longer than common client pools keep theirs)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from tokenmill.launch import event_loop, processes
from tokenmill.launch.cli import build_parser
from tokenmill.launch.flags import KEEP_ALIVE_S
from tokenmill.launch.http_server import make_server
from tokenmill.launch.specs import EngineSpec, FleetSpec, HttpSpec


@pytest.mark.parametrize("command", [["serve", "--model", "m"], ["frontend", "--nats", "n"]])
def test_defaults_asyncio_loop_and_long_keep_alive(command: list[str]):
    args = build_parser().parse_args(command)
    assert args.event_loop == "asyncio"
    assert args.timeout_keep_alive == KEEP_ALIVE_S > 15.0  # aiohttp keeps idle ones 15 s
    given = build_parser().parse_args(
        [*command, "--event-loop", "uvloop", "--timeout-keep-alive", "2.5"]
    )
    assert (given.event_loop, given.timeout_keep_alive) == ("uvloop", 2.5)


@pytest.mark.parametrize("command", [["worker", "--nats", "n"], ["router", "--nats", "n"]])
def test_workers_and_routers_default_to_uvloop(command: list[str]):
    assert build_parser().parse_args(command).event_loop == "uvloop"
    assert build_parser().parse_args([*command, "--event-loop", "asyncio"]).event_loop == "asyncio"


def test_serve_passes_the_worker_event_loop_to_its_workers():
    base = ["serve", "--engine", "mocker", "--model", "m", "--workers", "2"]
    for flags, expected in (([], "uvloop"), (["--worker-event-loop", "asyncio"], "asyncio")):
        args = build_parser().parse_args(base + flags)
        assert HttpSpec.from_args(args).event_loop == "asyncio"  # the frontend's own loop
        spec, fleet = EngineSpec.from_args(args), FleetSpec.from_args(args)
        argv = processes.worker_argv(spec, fleet.worker, "nats://127.0.0.1:1")
        worker = build_parser().parse_args(argv[argv.index("worker") :])
        assert worker.event_loop == expected


@pytest.mark.parametrize(
    ("name", "loop_type"), [("asyncio", asyncio.BaseEventLoop), ("uvloop", uvloop.Loop)]
)
def test_run_uses_the_named_loop(name: str, loop_type: type):
    async def main() -> object:
        return asyncio.get_running_loop()

    loop = event_loop.run(main(), name)
    assert isinstance(loop, loop_type)
    assert name == "uvloop" or not isinstance(loop, uvloop.Loop)


def test_run_rejects_an_unknown_loop():
    async def main() -> None: ...

    coro = main()
    with pytest.raises(ValueError, match="unknown event loop 'tokio'"):
        event_loop.run(coro, "tokio")
    coro.close()


async def _hello(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def _idle_connection_closed_after(keep_alive_s: float, idle_s: float) -> bool:
    """One request on a keep-alive connection, ``idle_s`` of silence: did the server close it?"""
    http = HttpSpec("127.0.0.1", 0, timeout_keep_alive_s=keep_alive_s, shutdown_timeout_s=1.0)
    server = make_server(_hello, http)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"
        try:
            closed = await asyncio.wait_for(reader.read(1), idle_s) == b""
        except TimeoutError:
            closed = False
        writer.close()
        return closed
    finally:
        server.should_exit = True
        await task


async def test_idle_connections_close_after_the_keep_alive_timeout():
    assert await _idle_connection_closed_after(0.3, 2.0)
    assert not await _idle_connection_closed_after(KEEP_ALIVE_S, 1.0)
