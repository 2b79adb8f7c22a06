"""Failure handling of the NATS runtime: sequence gaps and silence, a SIGKILLed server
process (broken stream, lease expiry), TCP token and TLS, a NATS server restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from runtime_handlers import Recorder

from tokenmill.runtime.interface import EndpointId, InstanceFailedError
from tokenmill.runtime.remote_stream import RemoteStream
from tokenmill.runtime.tcp_plane import make_ssl_contexts
from tokenmill.runtime.wire import StreamChunk

EP = EndpointId("ns", "backend", "generate")
CHILD = os.path.join(os.path.dirname(__file__), "nats_child.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stream(inactivity_s: float = 5.0) -> RemoteStream:
    return RemoteStream("r", "i", decode=bytes, inactivity_timeout_s=inactivity_s, deadline=None)


async def test_sequence_gap_is_an_instance_failure():
    stream = _stream()
    stream.deliver(StreamChunk(request_id="r", seq=0, payload=b"a"))
    stream.deliver(StreamChunk(request_id="r", seq=2, payload=b"c"))
    assert await stream.__anext__() == b"a"
    with pytest.raises(InstanceFailedError, match="chunk 2 of r, expected 1"):
        await stream.__anext__()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_silence_past_the_inactivity_timeout_is_an_instance_failure():
    stream = _stream(inactivity_s=0.1)
    stream.keepalive()
    stream.deliver(StreamChunk(request_id="r", seq=0, payload=b"a"))
    assert await stream.__anext__() == b"a"
    with pytest.raises(InstanceFailedError, match="no response"):
        await stream.__anext__()


async def test_killed_process_breaks_streams_and_its_leases_expire(nats_server, make_runtime):
    caller = await make_runtime(inactivity_timeout_s=1.0)
    child = subprocess.Popen(
        [sys.executable, CHILD, nats_server.url],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    try:
        assert child.stdout.readline().strip() == b"ready"
        client = caller.client(EP)
        watch = client.watch()
        added = {(await watch.__anext__()).instance.instance_id for _ in range(2)}
        assert added == {"tcp-child", "nats-child"}
        streams = {iid: client.generate("x", f"req-{iid}", instance_id=iid) for iid in added}
        for stream in streams.values():
            assert await stream.__anext__() == 0
        killed_at = time.monotonic()
        child.send_signal(signal.SIGKILL)
        child.wait()
        failed_after = {}

        async def drain(iid, stream):
            with pytest.raises(InstanceFailedError):
                async for _ in stream:
                    pass
            failed_after[iid] = time.monotonic() - killed_at

        await asyncio.gather(*(drain(iid, stream) for iid, stream in streams.items()))
        removed = {}
        while len(removed) < 2:
            event = await asyncio.wait_for(watch.__anext__(), 12)
            assert event.kind == "removed"
            removed[event.instance.instance_id] = time.monotonic() - killed_at
        await watch.aclose()
    finally:
        child.kill()
        child.wait()
    print(f"\nstream failure after kill: {failed_after}; lease expiry after kill: {removed}")
    assert failed_after["tcp-child"] < 1.0  # EOF on the socket, not a timeout
    assert failed_after["nats-child"] < 2.5  # the 1 s inactivity timeout
    assert max(removed.values()) < 10.0
    assert client.instances() == []


async def test_tcp_plane_rejects_a_wrong_token(make_runtime):
    server = await make_runtime(token="s3cret")
    wrong, right = await make_runtime(token="nope"), await make_runtime(token="s3cret")
    await server.serve_endpoint(EP, Recorder(count=2), instance_id="a")
    for rt in (wrong, right):
        await rt.client(EP).wait_for_instances(timeout_s=5)
    with pytest.raises(InstanceFailedError, match="handshake"):
        await wrong.client(EP).generate("x", "r1").__anext__()
    assert [x async for x in right.client(EP).generate("x", "r2")] == ["x-0", "x-1"]


def _self_signed(tmp_path) -> tuple[str, str]:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tcp_plane_over_tls(make_runtime, tmp_path):
    server_ctx, client_ctx = make_ssl_contexts(*_self_signed(tmp_path))
    server = await make_runtime(server_ssl=server_ctx, token="t")
    caller = await make_runtime(client_ssl=client_ctx, token="t")
    await server.serve_endpoint(EP, Recorder(count=3), instance_id="a")
    client = caller.client(EP)
    [info] = await client.wait_for_instances(timeout_s=5)
    assert info.address.startswith("tls://127.0.0.1:")
    assert [x async for x in client.generate("s", "r1")] == ["s-0", "s-1", "s-2"]


async def test_nats_restart_keeps_tcp_streams_and_components_reregister(nats_server, make_runtime):
    server = await make_runtime(request_plane="tcp")
    nats_plane = await make_runtime(request_plane="nats")
    caller = await make_runtime()
    tcp_handler = Recorder(count=3, gated=True)
    await server.serve_endpoint(EP, tcp_handler, instance_id="tcp-a")
    await nats_plane.serve_endpoint(EP, Recorder(count=2), instance_id="nats-a")
    client = caller.client(EP)
    while len(client.instances()) < 2:
        await client.wait_for_instances(timeout_s=5)
        await asyncio.sleep(0.02)
    stream = client.generate("t", "long", instance_id="tcp-a")
    tcp_handler.step.set()
    assert await stream.__anext__() == "t-0"

    restarted_at = time.monotonic()
    nats_server.restart(wipe_store=True)  # the server lost every lease
    tcp_handler.step.set()
    assert await stream.__anext__() == "t-1"  # the TCP stream is not cut
    for rt in (server, nats_plane, caller):
        await rt.wait_reconnected(1, timeout_s=10)
    await _until_async(lambda: _lease_keys(caller), {"tcp-a", "nats-a"}, 10)
    print(f"\nre-registered {time.monotonic() - restarted_at:.2f} s after the restart")
    assert {i.instance_id for i in client.instances()} == {"tcp-a", "nats-a"}
    tcp_handler.step.set()
    assert [x async for x in stream] == ["t-2"]
    assert [x async for x in client.generate("n", "r2", instance_id="nats-a")] == ["n-0", "n-1"]
    tcp_handler.gated = False
    assert [x async for x in client.generate("u", "r3", instance_id="tcp-a")] == [
        "u-0",
        "u-1",
        "u-2",
    ]


async def _lease_keys(rt) -> set[str]:
    try:
        keys = await (await rt._get_kv()).keys()
    except Exception:  # bucket not recreated yet
        return set()
    return {key.rsplit(".", 1)[1] for key in keys}


async def _until_async(get, expected, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while await get() != expected:
            await asyncio.sleep(0.05)


async def _until(predicate, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.05)
