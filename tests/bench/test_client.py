"""The bench client's measurements against a scripted fake server.

Tolerance: the client stamps each chunk when its bytes arrive; the server stamps each write on
the same perf_counter clock in the same process, so the difference is only loopback delivery and
one event-loop turn. We allow TIMING_TOL_S = 5 ms for single stamps (TTFT, E2E) and 2 ms for the
per-request ITL (a difference of two stamps whose delivery delays mostly cancel); against the
*scripted* delays (which asyncio.sleep only lower-bounds) we allow 50 ms on a shared 2-core box.
"""

from __future__ import annotations

import pytest
from fake_openai_server import Script

from tokenmill.bench.client import ClientConfig, HttpClient, SseParser, send_request
from tokenmill.bench.metrics import errors_by_kind, itl_s, summarize, ttft_s
from tokenmill.bench.traces import TraceRequest

TIMING_TOL_S = 0.005
ITL_TOL_S = 0.002
SCRIPT_TOL_S = 0.050

TOKEN_REQUEST = TraceRequest(0.0, 700, 6, ((1, 512), (2, 188)))
TEXT_REQUEST = TraceRequest(0.0, 5, 6, prompt_text="hello there")


async def _send(server, request=TOKEN_REQUEST, index=0, **cfg_kw):
    cfg = ClientConfig(server.url, "fake", **cfg_kw)
    async with HttpClient(cfg) as client:
        return await send_request(client, request, index, cfg)


async def test_ttft_itl_e2e_match_the_server_stamps(fake_server):
    script = Script(ttft_s=0.15, itl_s=0.03, num_tokens=6, cached_tokens=512)
    server = await fake_server(lambda n, body: script)
    # Warm-up: the first request of a fresh process pays one-time costs on both sides (lazy
    # imports, the first connection); a clean CI clone measured 0.36 s of them.
    await _send(server)
    record = await _send(server, index=1)
    served = server.served[1]
    timing = record.timing()
    assert record.error is None and record.num_output_tokens == 6
    assert len(record.chunk_times_s) == 6
    # client-vs-server stamps, same clock
    assert 0 <= record.first_token_s - served.token_write_s[0] < TIMING_TOL_S
    assert 0 <= record.end_s - served.end_s < TIMING_TOL_S
    server_itl = (served.token_write_s[-1] - served.token_write_s[0]) / 5
    assert abs(itl_s(timing) - server_itl) < ITL_TOL_S
    for client_t, server_t in zip(record.chunk_times_s, served.token_write_s, strict=True):
        assert 0 <= client_t - server_t < TIMING_TOL_S
    # client-vs-script
    assert 0.15 <= ttft_s(timing) < 0.15 + SCRIPT_TOL_S
    assert 0.03 <= itl_s(timing) < 0.03 + SCRIPT_TOL_S
    assert record.num_prompt_tokens == 700 and record.num_cached_tokens == 512


async def test_token_id_prompt_goes_to_completions_with_exact_ids(fake_server):
    server = await fake_server(lambda n, body: Script(num_tokens=2, ttft_s=0, itl_s=0))
    await _send(server)
    served = server.served[0]
    assert served.path == "/v1/completions"
    assert served.body["prompt"] == TOKEN_REQUEST.prompt_token_ids()
    assert served.body["max_tokens"] == 6 and served.body["ignore_eos"] is True
    assert served.body["stream_options"] == {"include_usage": True}


async def test_text_prompt_goes_to_chat_and_counts_chunks_without_usage(fake_server):
    script = Script(num_tokens=3, ttft_s=0, itl_s=0, report_usage=False)
    server = await fake_server(lambda n, body: script)
    record = await _send(server, TEXT_REQUEST, ignore_eos=False)
    served = server.served[0]
    assert served.path == "/v1/chat/completions"
    assert served.body["messages"] == [{"role": "user", "content": "hello there"}]
    assert "ignore_eos" not in served.body
    assert record.error is None and record.num_output_tokens == 3
    assert record.num_prompt_tokens is None and record.num_cached_tokens is None


async def test_errors_are_classified_and_counted(fake_server):
    kinds = ["ok", "http_503", "hang", "drop", "sse_error", "ok"]
    server = await fake_server(lambda n, body: Script(kind=kinds[n], ttft_s=0.01, itl_s=0.005))
    cfg = ClientConfig(server.url, "fake", timeout_s=0.5)
    async with HttpClient(cfg) as client:
        records = [await send_request(client, TOKEN_REQUEST, i, cfg) for i in range(len(kinds))]
    assert [r.error for r in records] == [
        None,
        "http_503",
        "timeout",
        "connection_dropped",
        "sse_error",
        None,
    ]
    assert 0.5 <= records[2].end_s - records[2].send_s < 0.5 + SCRIPT_TOL_S
    assert "overloaded" in records[1].error_detail
    summary = summarize([r.timing() for r in records], duration_s=1.0)
    assert summary["errors"] == {
        "connection_dropped": 1,
        "http_503": 1,
        "sse_error": 1,
        "timeout": 1,
    }
    assert summary["completed"] == 2 and summary["failed"] == 4
    assert errors_by_kind([r.timing() for r in records]) == summary["errors"]


async def test_connect_error_when_nothing_listens():
    cfg = ClientConfig("http://127.0.0.1:9", "fake", timeout_s=5.0)  # port 9: discard, closed
    async with HttpClient(cfg) as client:
        record = await send_request(client, TOKEN_REQUEST, 0, cfg)
    assert record.error == "connect_error"


def test_sse_parser_handles_split_lines_comments_and_event_types():
    parser = SseParser()
    assert parser.feed(b': keep-alive\n\ndata: {"a"') == []
    assert parser.feed(b": 1}\r\n\r\nevent: error\ndata: x\ndata: y\n\n") == [
        ("message", '{"a": 1}'),
        ("error", "x\ny"),
    ]
    assert parser.feed(b"data: [DONE]\n") == []
    assert parser.feed(b"\n") == [("message", "[DONE]")]


def test_chat_endpoint_rejects_token_id_prompts():
    from tokenmill.bench.client import request_body

    with pytest.raises(ValueError, match="completions"):
        request_body(TOKEN_REQUEST, ClientConfig("http://x", "m", endpoint="chat"))


def test_events_update_the_record():
    from tokenmill.bench.client import RequestRecord, _apply_event

    record = RequestRecord(0, None)
    assert not _apply_event(
        record, "message", '{"choices": [{"delta": {"role": "assistant"}}]}', 1.0
    )
    assert record.first_token_s is None  # a role-only chunk is not a token
    assert record.response_id is None  # the chunk had no id
    assert not _apply_event(
        record, "message", '{"id": "cmpl-1", "error": null, "choices": [{"text": "a"}]}', 2.0
    )
    assert not _apply_event(
        record, "message", '{"id": "x", "choices": [{"text": "b", "finish_reason": "stop"}]}', 3.0
    )
    assert (record.first_token_s, record.chunk_times_s, record.finished) == (2.0, [2.0, 3.0], True)
    assert record.response_id == "cmpl-1"  # the first id seen is kept
    assert _apply_event(record, "message", "[1, 2]", 4.0) and record.error == "bad_payload"
