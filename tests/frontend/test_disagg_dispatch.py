"""The frontend's conditional disaggregation with scripted workers (no engine, no network):
the decision per request; the prefill leg's first token goes to the client at once; a
failing prefill worker means a local prefill on the decode worker and no client error; a
decode leg that ends before its first output (rejected, died, client gone) releases the
prefill worker's held blocks at once; a decode worker that took over leaves the release to
its READ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tokenmill.core.errors import EngineDeadError, InvalidRequestError
from tokenmill.core.kv_transfer import KvTransferParams
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput
from tokenmill.core.sampling import SamplingParams
from tokenmill.frontend.disagg import DisaggDispatcher
from tokenmill.router.disagg import DisaggConfig, DisaggMode
from tokenmill.routing.dispatch import Dispatcher
from tokenmill.routing.models import DECODE_ROLES, PREFILL_ROLES, RoleView
from tokenmill.runtime.interface import (
    EndpointClient,
    EndpointId,
    InstanceFailedError,
    ResponseStream,
)
from tokenmill.runtime.wire import InstanceInfo

HELD = KvTransferParams(do_remote_decode=True, remote_request_id="r", num_tokens=600)


class Stream(ResponseStream):
    def __init__(self, rid: str, instance_id: str, script: list):
        self.request_id, self.instance_id, self._script = rid, instance_id, list(script)
        self.closed = False

    async def __anext__(self):
        if not self._script:
            raise StopAsyncIteration
        item = self._script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        self.closed = True


class Workers(EndpointClient):
    """Instances ``p`` (prefill) and ``d`` (decode); ``scripts[instance]`` answers a call."""

    def __init__(self, scripts: dict[str, list]):
        self.endpoint = EndpointId("n", "c", "generate")
        self.scripts = scripts
        self.requests: list[tuple[str, EngineRequest]] = []

    def instances(self) -> list[InstanceInfo]:
        roles = {"p": "prefill", "d": "decode"}
        return [
            InstanceInfo(
                namespace="n",
                component="c",
                endpoint="generate",
                instance_id=i,
                metadata={"model": "m", "role": roles[i]},
            )
            for i in roles
            if i in self.scripts
        ]

    async def wait_for_instances(self, timeout_s=None):
        return self.instances()

    async def watch(self) -> AsyncIterator:  # pragma: no cover - not used
        if False:
            yield

    def generate(self, request, request_id, instance_id=None, deadline_s=None):
        self.requests.append((instance_id, request))
        return Stream(request_id, instance_id, self.scripts[instance_id])


def out(tokens, finish=None, params=None, cached=0, total=None) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        new_token_ids=tokens,
        finish_reason=finish,
        num_output_tokens=len(tokens) if total is None else total,
        kv_transfer_params=params,
        num_cached_tokens=cached,
    )


def build(scripts, mode=DisaggMode.ALWAYS):
    workers = Workers(scripts)
    released: list[tuple[str, list[str]]] = []

    async def release(instance_id, request_ids):
        released.append((instance_id, request_ids))

    prefill = Dispatcher(RoleView(workers, "m", PREFILL_ROLES))
    decode = RoleView(workers, "m", DECODE_ROLES)
    dispatcher = DisaggDispatcher(decode, None, prefill, DisaggConfig(mode), release)
    return dispatcher, workers, released


def request(max_tokens=4) -> EngineRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return EngineRequest(request_id="r", prompt_token_ids=list(range(600)), params=params)


async def drain(stream) -> list[RequestOutput]:
    outs = []
    while True:
        try:
            outs.extend(await stream.next_batch())
        except StopAsyncIteration:
            return outs


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_remote_prefill_then_decode_with_the_params():
    scripts = {
        "p": [out([11], FinishReason.LENGTH, HELD, cached=32)],
        "d": [out([12]), out([13]), out([14], FinishReason.LENGTH, total=3)],
    }
    dispatcher, workers, released = build(scripts)
    stream = await dispatcher.open(request(), None)
    first = await stream.next_batch()
    assert [o.new_token_ids for o in first] == [[11]] and first[0].finish_reason is None
    assert first[0].kv_transfer_params is None  # never shown to the client
    rest = await drain(stream)
    assert [t for o in rest for t in o.new_token_ids] == [12, 13, 14]
    assert rest[-1].num_output_tokens == 4 and rest[-1].num_cached_tokens == 32
    (_, leg1), (_, leg2) = workers.requests
    assert leg1.params.max_tokens == 1 and leg1.kv_transfer_params.do_remote_decode
    assert leg2.prompt_token_ids == [*range(600), 11] and leg2.params.max_tokens == 3
    assert leg2.kv_transfer_params.do_remote_prefill
    assert stream.disagg == {"remote": True, "reason": "mode_always", "prefill_worker": "p"}
    await settle()
    assert released == []  # the decode worker's READ releases the hold


@pytest.mark.parametrize(
    "failure", [InstanceFailedError("gone"), EngineDeadError("dead"), StopAsyncIteration()]
)
async def test_failed_prefill_falls_back_to_a_local_prefill(failure):
    scripts = {"p": [failure], "d": [out([11]), out([12], FinishReason.LENGTH)]}
    dispatcher, workers, released = build(scripts)
    stream = await dispatcher.open(request(2), None)
    outs = await drain(stream)
    assert [t for o in outs for t in o.new_token_ids] == [11, 12]
    assert workers.requests[-1][1].prompt_token_ids == list(range(600))  # the whole prompt
    assert workers.requests[-1][1].kv_transfer_params is None
    assert "fallback" in stream.disagg


async def test_a_client_error_from_the_prefill_leg_is_the_clients():
    scripts = {"p": [InvalidRequestError("bad", "prompt")], "d": []}
    dispatcher, _, _ = build(scripts)
    stream = await dispatcher.open(request(), None)
    with pytest.raises(InvalidRequestError):
        await stream.next_batch()


async def test_decode_rejection_releases_the_hold_at_once():
    scripts = {
        "p": [out([11], FinishReason.LENGTH, HELD)],
        "d": [InvalidRequestError("duplicate request id", "request_id")],
    }
    dispatcher, _, released = build(scripts)
    stream = await dispatcher.open(request(), None)
    await stream.next_batch()
    with pytest.raises(InvalidRequestError):
        await stream.next_batch()
    await settle()
    assert released == [("p", ["r"])]


async def test_decode_worker_dying_mid_transfer_releases_the_hold():
    scripts = {"p": [out([11], FinishReason.LENGTH, HELD)], "d": [InstanceFailedError("x")]}
    dispatcher, _, released = build(scripts)
    stream = await dispatcher.open(request(), None)
    await stream.next_batch()
    with pytest.raises(InstanceFailedError):  # the migration layer moves the request on
        await stream.next_batch()
    await settle()
    assert released == [("p", ["r"])]


async def test_client_leaving_mid_transfer_releases_the_hold():
    scripts = {"p": [out([11], FinishReason.LENGTH, HELD)], "d": [out([12])]}
    dispatcher, _, released = build(scripts)
    stream = await dispatcher.open(request(), None)
    await stream.next_batch()
    await stream.aclose()  # before the decode worker's first output
    await settle()
    assert released == [("p", ["r"])]


async def test_first_token_that_ends_the_request_releases_and_stops():
    scripts = {"p": [out([2], FinishReason.STOP, HELD)], "d": []}
    dispatcher, workers, released = build(scripts)
    stream = await dispatcher.open(request(), None)
    outs = await drain(stream)
    assert outs[-1].finish_reason is FinishReason.STOP and len(workers.requests) == 1
    await settle()
    assert released == [("p", ["r"])]


async def test_auto_short_prompt_and_never_stay_local():
    for mode, prompt in ((DisaggMode.AUTO, 100), (DisaggMode.NEVER, 600)):
        scripts = {"p": [], "d": [out([1], FinishReason.LENGTH)]}
        dispatcher, workers, _ = build(scripts, mode)
        req = EngineRequest(request_id="r", prompt_token_ids=list(range(prompt)))
        stream = await dispatcher.open(req, None)
        assert (await drain(stream))[-1].finish_reason is FinishReason.LENGTH
        assert [i for i, _ in workers.requests] == ["d"]
