"""A handler that raises each registered error (and a plain ``KeyError``), served over the
in-process runtime and the NATS runtime with either request plane (a real nats-server):
the client sees the same status, error JSON and headers after ``classify`` on all three, as
the error raised before the first item or after one."""

from __future__ import annotations

import pytest
from error_samples import all_samples

from tokenmill.core.errors import InternalError
from tokenmill.frontend.errors import classify
from tokenmill.runtime.inprocess import InProcessRuntime
from tokenmill.runtime.interface import EndpointId

EP = EndpointId("ns", "backend", "generate")


async def raising(request: str, ctx):
    """Raises ``all_samples()[code]`` for ``"code"`` (at once) or ``"code:late"`` (after one
    item)."""
    code, _, when = request.partition(":")
    if when == "late":
        yield "first"
    raise all_samples()[code]


async def errors_seen(client) -> dict[str, tuple[BaseException, list[str]]]:
    """request -> (the error the client's stream ended with, the items before it)."""
    seen = {}
    for code in all_samples():
        for request in (code, f"{code}:late"):
            items: list[str] = []
            with pytest.raises(Exception) as info:  # noqa: PT011  # each sample's own class
                async for item in client.generate(request, f"id-{request}"):
                    items.append(item)
            seen[request] = (info.value, items)
    return seen


def assert_same_answers(seen, networked: bool):
    for request, (exc, items) in seen.items():
        original = all_samples()[request.partition(":")[0]]
        assert items == (["first"] if request.endswith(":late") else []), request
        assert classify(exc) == classify(original), request
        expected = InternalError if networked and isinstance(original, KeyError) else type(original)
        assert type(exc) is expected, request


async def test_in_process_runtime_passes_the_errors_themselves():
    runtime = InProcessRuntime()
    await runtime.serve_endpoint(EP, raising, instance_id="a")
    assert_same_answers(await errors_seen(runtime.client(EP)), networked=False)
    await runtime.shutdown()


@pytest.mark.parametrize("plane", ["tcp", "nats"])
async def test_nats_runtime_rebuilds_the_same_errors(make_runtime, plane):
    server, caller = await make_runtime(request_plane=plane), await make_runtime()
    await server.serve_endpoint(EP, raising, instance_id="a", request_type=str)
    client = caller.client(EP, response_type=str)
    await client.wait_for_instances(timeout_s=5)
    assert_same_answers(await errors_seen(client), networked=True)
