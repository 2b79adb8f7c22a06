"""The streaming path in batches, without HTTP: a batch of worker outputs becomes events in one
call (stop strings, errors after events, n > 1 merged), SSE chunks are byte for byte the
OpenAI objects, ``SSEResponse`` writes headers with the first frames and ends the body with
``[DONE]``, the cheap histograms render as ``prometheus_client``'s, and router-replica changes
are published in order by one task."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tokenmill.core.errors import RequestAbortedError
from tokenmill.core.request import EngineRequest, FinishReason, RequestOutput, TokenLogprob
from tokenmill.core.sampling import SamplingParams
from tokenmill.frontend.metrics import FastHistogram, FrontendMetrics
from tokenmill.frontend.preprocess import ServedModel
from tokenmill.frontend.responses import ResponseMeta, StreamFormatter, Usage, sse
from tokenmill.frontend.serving import ChoiceEvent, ChoiceStream, MergedStream, ServeContext
from tokenmill.frontend.sse import SSE_DONE, SSEResponse
from tokenmill.routing.kv_policy import KvRouterPolicy
from tokenmill.routing.replicas import ReplicaSync
from tokenmill.runtime.kv_wire import RouteEvent


class _Letters:
    """Token id ``i`` is the letter ``chr(97 + i)``; id 25 ("z") is special (skipped)."""

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return "".join("" if skip_special_tokens and i == 25 else chr(97 + i) for i in ids)


class _Dispatcher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def prefill_done(self, request_id: str) -> None:
        self.calls.append(("prefill_done", request_id))

    def finished(self, request_id: str) -> None:
        self.calls.append(("finished", request_id))


class _Batches:
    """A worker stream that returns the given batches, then ends; ``closed`` after aclose."""

    def __init__(self, *batches: list[RequestOutput]):
        self.batches, self.closed = list(batches), False

    async def next_batch(self) -> list[RequestOutput]:
        await asyncio.sleep(0)
        if not self.batches:
            raise StopAsyncIteration
        return self.batches.pop(0)

    async def aclose(self) -> None:
        self.closed = True


def out(*ids: int, finish: FinishReason | None = None, num: int = 0) -> RequestOutput:
    return RequestOutput(
        request_id="r", new_token_ids=list(ids), finish_reason=finish, num_output_tokens=num
    )


def choice(ctx: ServeContext, stream: _Batches, index: int = 0, stop: tuple[str, ...] = ()):
    request = EngineRequest(
        request_id=f"r-{index}", prompt_token_ids=[1, 2], params=SamplingParams(stop=stop)
    )
    return ChoiceStream(ctx, index, request, stream, arrival=0.0)  # type: ignore[arg-type]


@pytest.fixture
def ctx() -> ServeContext:
    return ServeContext(ServedModel("m", _Letters(), 100), _Dispatcher(), FrontendMetrics())  # type: ignore[arg-type]


def samples(metrics: FrontendMetrics, name: str) -> float:
    text = generate_latest(metrics.registry).decode()
    line = next(ln for ln in text.splitlines() if ln.startswith((name + " ", name + "{")))
    return float(line.rsplit(" ", 1)[1])


async def test_a_batch_of_outputs_becomes_its_events_in_one_call(ctx):
    stream = _Batches([out(0), out(1), out(2)], [out(3, finish=FinishReason.LENGTH, num=4)])
    c = choice(ctx, stream)
    first = await c.next_batch()
    assert [e.text for e in first] == ["a", "b", "c"] and first[-1].finish_reason is None
    last = await c.next_batch()
    assert [(e.text, e.finish_reason, e.num_output_tokens) for e in last] == [("d", "length", 4)]
    with pytest.raises(StopAsyncIteration):
        await c.next_batch()
    await c.aclose()
    await c.aclose()  # idempotent
    assert stream.closed and ctx.dispatcher.calls == [("prefill_done", "r-0"), ("finished", "r-0")]
    # TTFT once; ITL once per later token: 2 that came with the first, 1 in the next batch
    name = "tokenmill_inter_token_latency_seconds_count"
    assert samples(ctx.metrics, "tokenmill_time_to_first_token_seconds_count") == 1.0
    assert samples(ctx.metrics, name) == 3.0
    assert samples(ctx.metrics, "tokenmill_e2e_request_latency_seconds_count") == 1.0


async def test_a_stop_string_inside_a_batch_ends_the_choice_and_drops_the_rest(ctx):
    stream = _Batches([out(0), out(1), out(2), out(3), out(4)])
    c = choice(ctx, stream, stop=("bc",))
    events = await c.next_batch()
    assert [(e.text, e.finish_reason) for e in events] == [("a", None), ("", "stop")]
    with pytest.raises(StopAsyncIteration):
        await c.next_batch()


async def test_an_engine_error_is_raised_after_the_events_before_it(ctx):
    c = choice(ctx, _Batches([out(0), out(1), out(finish=FinishReason.ABORT)]))
    assert [e.text for e in await c.next_batch()] == ["a", "b"]
    with pytest.raises(RequestAbortedError):
        await c.next_batch()


async def test_merged_choices_return_every_ready_event_and_end_together(ctx):
    done = FinishReason.LENGTH
    streams = [
        _Batches([out(0), out(1)], [out(2, finish=done)]),
        _Batches([out(3)], [out(4, finish=done)]),
    ]
    merged = MergedStream([choice(ctx, s, i) for i, s in enumerate(streams)])
    batches = []
    with pytest.raises(StopAsyncIteration):
        while True:
            batches.append(await merged.next_batch())
    await merged.aclose()
    events = [(e.index, e.text) for batch in batches for e in batch]
    assert sorted(events) == [(0, "a"), (0, "b"), (0, "c"), (1, "d"), (1, "e")]
    assert len(batches) < len(events)  # events ready together came in one batch
    assert all(s.closed for s in streams)


async def test_closing_a_merged_stream_early_closes_every_choice(ctx):
    streams = [_Batches([out(0)], [out(1)]) for _ in range(3)]
    merged = MergedStream([choice(ctx, s, i) for i, s in enumerate(streams)])
    await merged.aclose()
    assert all(s.closed for s in streams)
    assert sorted(c for c, _ in ctx.dispatcher.calls) == ["finished"] * 3


def _reference_chunk(meta: ResponseMeta, event: ChoiceEvent, first: bool, usage: bool):
    """The chunk as a dict, the way OpenAI lays it out."""
    lp = None
    if meta.chat:
        delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
        if event.logprobs:
            lp = {
                "content": [
                    {
                        "token": chr(97 + t.token_id),
                        "logprob": t.logprob,
                        "bytes": [97 + t.token_id],
                        "top_logprobs": [],
                    }
                    for t in event.logprobs
                ]
            }
        body = {
            "index": event.index,
            "delta": delta,
            "logprobs": lp,
            "finish_reason": event.finish_reason,
        }
    else:
        if event.logprobs:
            lp = {
                "tokens": [chr(97 + t.token_id) for t in event.logprobs],
                "token_logprobs": [t.logprob for t in event.logprobs],
                "top_logprobs": [{} for _ in event.logprobs],
                "text_offset": [0],
            }
        body = {
            "index": event.index,
            "text": event.text,
            "logprobs": lp,
            "finish_reason": event.finish_reason,
        }
    obj = "chat.completion.chunk" if meta.chat else "text_completion"
    chunk = {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "choices": [body],
    }
    if usage:
        chunk["usage"] = None
    return sse(chunk)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
def test_chunks_are_the_openai_objects_byte_for_byte(chat, include_usage):
    meta = ResponseMeta('id-"1"', "m\u00e9", chat, created=7)
    fmt = StreamFormatter(meta, lambda t: chr(97 + t), include_usage)
    events = [
        ChoiceEvent(0, 'he said "hi"\n'),
        ChoiceEvent(1, "\u00e9t\u00e9"),
        ChoiceEvent(0, "x", [TokenLogprob(1, -0.5, [])]),
        ChoiceEvent(1, "", None, "stop"),
    ]
    expected = b"".join(
        _reference_chunk(meta, e, i < 2, include_usage) for i, e in enumerate(events)
    )
    assert fmt.chunks(events) == expected
    if include_usage:
        usage = msgspec.json.decode(fmt.usage_chunk(Usage(1, 3))[6:])
        assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 3


async def _frames(*items: bytes):
    for item in items:
        yield item


async def _send_all(frames) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client never leaves
        return {}

    await SSEResponse(frames)({"type": "http"}, receive, send)
    return sent


async def test_sse_headers_go_with_the_first_frames_and_done_ends_the_body():
    sent = await _send_all(_frames(b"data: 1\n\ndata: 2\n\n", b"data: 3\n\n" + SSE_DONE))
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert [m["more_body"] for m in sent[1:]] == [True, False]
    sent = await _send_all(_frames(b"data: 1\n\n"))  # no [DONE]: an empty message ends it
    assert [(m.get("body"), m.get("more_body")) for m in sent[1:]] == [
        (b"data: 1\n\n", True),
        (b"", False),
    ]


def test_fast_histogram_renders_as_prometheus_client_histogram():
    prometheus_client.disable_created_metrics()
    buckets = (0.001, 0.01, 0.1, 1.0)
    slow, fast = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "doc", buckets=buckets, registry=slow)
    histogram = FastHistogram("x_seconds", "doc", buckets, fast)
    for value, count in [(0.0, 1), (0.001, 2), (0.05, 1), (1.0, 3), (7.5, 1)]:
        histogram.observe(value, count)
        for _ in range(count):
            reference.observe(value)
    assert generate_latest(fast) == generate_latest(slow)


class _Runtime:
    def __init__(self) -> None:
        self.published: list[Any] = []

    def subscribe(self, *args: Any) -> Any:
        return _NoMessages()

    async def publish(self, namespace: str, component: str, topic: str, message: Any) -> None:
        await asyncio.sleep(0)
        self.published.append(message)


class _NoMessages:
    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        pass


def _changes(published: list[Any]) -> list[tuple[str, str]]:
    return [(e.kind, e.request_id) for e in published if e.kind != "hello"]


async def test_replica_changes_are_published_in_order_and_flushed_on_stop():
    policy = KvRouterPolicy.create("round-robin")
    runtime = _Runtime()
    sync = ReplicaSync(runtime, "ns", "c", policy)  # type: ignore[arg-type]
    await sync.start()
    sync.receive(RouteEvent(kind="hello", replica_id="peer", request_id=""))
    await policy.select(EngineRequest(request_id="a", prompt_token_ids=[1] * 40), ["w"])
    policy.on_prefill_done("a")
    policy.on_finished("a")
    await sync.stop()  # before the sender ran: stop publishes what is queued
    assert _changes(runtime.published) == [("added", "a"), ("prefill_done", "a"), ("freed", "a")]
    added = next(e for e in runtime.published if e.kind == "added")
    assert added.instance_id == "w"
    # the new peer was answered at once, besides the start-up hello
    assert [e.kind for e in runtime.published].count("hello") == 2


async def test_a_lone_replica_publishes_only_hellos_until_a_peer_is_heard():
    policy = KvRouterPolicy.create("round-robin")
    runtime = _Runtime()
    sync = ReplicaSync(runtime, "ns", "c", policy, peer_ttl_s=0.05)  # type: ignore[arg-type]
    await sync.start()
    await policy.select(EngineRequest(request_id="a", prompt_token_ids=[1] * 40), ["w"])
    sync.receive(RouteEvent(kind="hello", replica_id="peer", request_id=""))
    await policy.select(EngineRequest(request_id="b", prompt_token_ids=[1] * 40), ["w"])
    await asyncio.sleep(0.1)  # the peer goes silent past its TTL
    policy.on_finished("b")
    await sync.stop()
    assert _changes(runtime.published) == [("added", "b")]
    assert sync.num_applied == 0  # a hello is not a change
