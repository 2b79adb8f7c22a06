"""Trace readers: every parser names file and line of a malformed row; the Mooncake hash-id ->
tokens mapping is pinned (the offline replay relies on it); windows, synthetic workloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokenmill.bench.traces import (
    SyntheticConfig,
    TraceError,
    TraceRequest,
    ideal_prefix_hit_ratio,
    load_workload,
    mooncake_block_tokens,
    mooncake_tokens,
    read_aibrix,
    read_azure,
    read_mooncake,
    select_window,
    synthetic_multi_turn,
    synthetic_shared_prefix,
)

TRACES = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"
MOONCAKE_OK = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [7, 9]}'
AIBRIX_OK = (
    '{"timestamp": 10, "requests": [{"Prompt Length": 3, "Output Length": 2, "prompt": "hi"}]}'
)
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
AZURE_OK = "2023-11-16 18:15:46.6805900,374,44"


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _reference(hash_id: int, i: int) -> int:
    """Pure-Python statement of the documented mooncake_block_tokens mix."""
    mask = (1 << 64) - 1
    x = ((hash_id + 1) * 0x632BE59BD9B4E019 + i * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 29)) * 0xBF58476D1CE4E5B9) & mask
    return x ^ (x >> 32)


def test_mooncake_block_tokens_is_the_documented_mix():
    block = mooncake_block_tokens(46, 512, vocab_size=32000, min_token_id=100)
    assert block.shape == (512,)
    assert block.tolist() == [100 + _reference(46, i) % 31900 for i in range(512)]
    assert mooncake_block_tokens(0, 4).tolist() == [_reference(0, i) % 32000 for i in range(4)]
    assert mooncake_block_tokens(7, 100).tolist() == mooncake_block_tokens(7).tolist()[:100]
    assert mooncake_block_tokens(7).tolist() != mooncake_block_tokens(8).tolist()


def test_mooncake_tokens_vectorized_rows_are_the_blocks():
    ids = np.array([0, 1, 46, 12345, 2**40 + 3, 2**64 - 1], dtype=np.uint64)
    rows = mooncake_tokens(ids, 512, vocab_size=256)
    assert rows.shape == (6, 512) and rows.dtype == np.int64
    for row, hash_id in zip(rows, ids.tolist(), strict=True):
        assert row.tolist() == mooncake_block_tokens(hash_id, 512, vocab_size=256).tolist()
    assert rows[5, :3].tolist() == [_reference(2**64 - 1, i) % 256 for i in range(3)]
    with pytest.raises(ValueError):
        mooncake_tokens(ids, 4, vocab_size=10, min_token_id=10)


def test_read_mooncake_max_requests(tmp_path):
    later = MOONCAKE_OK.replace('"timestamp": 0', '"timestamp": 5')
    path = _write(tmp_path, "t.jsonl", [MOONCAKE_OK, later, "{not json"])
    assert [r.arrival_ms for r in read_mooncake(path, max_requests=2)] == [0.0, 5.0]
    assert read_mooncake(path, max_requests=0) == []


def test_mooncake_prompt_is_blocks_cut_to_input_length(tmp_path):
    (req,) = read_mooncake(_write(tmp_path, "t.jsonl", [MOONCAKE_OK]))
    assert req.hash_ids == (7, 9) and req.segments == ((7, 512), (9, 88))
    ids = req.prompt_token_ids()
    assert len(ids) == 600
    assert ids[:512] == mooncake_block_tokens(7).tolist()
    assert ids[512:] == mooncake_block_tokens(9).tolist()[:88]


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ("{not json", "not valid JSON"),
        ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [7]}', "hash_ids"),
        ('{"timestamp": -1, "input_length": 6, "output_length": 5, "hash_ids": [7]}', "timestamp"),
        (
            '{"timestamp": 0, "input_length": "6", "output_length": 5, "hash_ids": [7]}',
            "input_length",
        ),
        ('{"timestamp": 0, "input_length": 6, "hash_ids": [7]}', "output_length"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_mooncake_rejects_malformed_row_naming_the_line(tmp_path, row, why):
    path = _write(tmp_path, "t.jsonl", [MOONCAKE_OK, "", row])
    with pytest.raises(TraceError, match=why) as err:
        read_mooncake(path)
    assert str(err.value).startswith(f"{path}:3:")


def test_timestamps_must_not_go_backwards(tmp_path):
    later = MOONCAKE_OK.replace('"timestamp": 0', '"timestamp": 50')
    path = _write(tmp_path, "t.jsonl", [later, MOONCAKE_OK])
    with pytest.raises(TraceError, match=rf"^{path}:2: timestamp 0.0 is earlier"):
        read_mooncake(path)


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ("2023-11-16 18:15:47.0,374", "3 columns"),
        ("yesterday,374,44", "bad value"),
        ("2023-11-16 18:15:47.0,0,44", "ContextTokens >= 1"),
        ("2023-11-16 18:15:47.0,x,44", "bad value"),
    ],
)
def test_azure_rejects_malformed_row_naming_the_line(tmp_path, row, why):
    path = _write(tmp_path, "a.csv", [AZURE_HEADER, AZURE_OK, row])
    with pytest.raises(TraceError, match=why) as err:
        read_azure(path)
    assert str(err.value).startswith(f"{path}:3:")


def test_azure_header_checked_and_times_become_ms_offsets(tmp_path):
    with pytest.raises(TraceError, match=r":1: expected header"):
        read_azure(_write(tmp_path, "bad.csv", ["a,b,c", AZURE_OK]))
    path = _write(
        tmp_path, "a.csv", [AZURE_HEADER, AZURE_OK, "2023-11-16 18:15:50.9951690,396,109"]
    )
    first, second = read_azure(path)
    assert first.arrival_ms == 0.0
    assert second.arrival_ms == pytest.approx(4314.579, abs=1e-3)
    assert (second.num_input_tokens, second.num_output_tokens) == (396, 109)
    assert len(second.prompt_token_ids()) == 396
    assert first.hash_ids != second.hash_ids  # no prefix sharing in Azure


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ('{"timestamp": 20, "requests": []}', "non-empty list"),
        ('{"timestamp": 20, "requests": [{"Prompt Length": 3, "Output Length": 2}]}', "prompt"),
        (
            '{"timestamp": 20, "requests": [{"Prompt Length": 0, "Output Length": 2, "prompt": "x"}]}',
            "Prompt Length",
        ),
        ('{"requests": [{"Prompt Length": 3, "Output Length": 2, "prompt": "x"}]}', "timestamp"),
        ('{"timestamp": 20, "requests": ["x"]}', "object"),
    ],
)
def test_aibrix_rejects_malformed_row_naming_the_line(tmp_path, row, why):
    path = _write(tmp_path, "w.jsonl", [AIBRIX_OK, row])
    with pytest.raises(TraceError, match=why) as err:
        read_aibrix(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_aibrix_expands_instants_and_rebases(tmp_path):
    two = json.dumps(
        {
            "timestamp": 30,
            "requests": [
                {"Prompt Length": 4, "Output Length": 0, "prompt": "a b"},
                {"Prompt Length": 5, "Output Length": 1, "prompt": "c"},
            ],
        }
    )
    reqs = read_aibrix(_write(tmp_path, "w.jsonl", [AIBRIX_OK, two]))
    assert [(r.arrival_ms, r.prompt_text, r.num_output_tokens) for r in reqs] == [
        (0.0, "hi", 2),
        (20.0, "a b", 0),
        (20.0, "c", 1),
    ]
    with pytest.raises(ValueError, match="text prompt"):
        reqs[0].prompt_token_ids()


def test_load_workload_errors_are_clear(tmp_path):
    with pytest.raises(TraceError, match="needs --trace"):
        load_workload("mooncake", None, SyntheticConfig())
    with pytest.raises(TraceError, match="no such trace file"):
        load_workload("azure", tmp_path / "missing.csv", SyntheticConfig())
    with pytest.raises(TraceError, match="unknown trace format"):
        load_workload("sharegpt", None, SyntheticConfig())


def test_window_keeps_start_inclusive_end_exclusive_and_rebases():
    reqs = [TraceRequest(float(t), 1, 1, ((t, 1),)) for t in (0, 999, 1000, 2500, 3000)]
    assert [r.arrival_ms for r in select_window(reqs, 1.0, 3.0)] == [0.0, 1500.0]
    assert len(select_window(reqs)) == 5


def test_synthetic_shared_prefix_shares_exactly_the_group_prefix():
    cfg = SyntheticConfig(num_requests=50, num_groups=2, prefix_tokens=64, suffix_tokens=16)
    reqs = synthetic_shared_prefix(cfg)
    assert len(reqs) == 50 and reqs == synthetic_shared_prefix(cfg)  # seeded
    assert len({r.segments[0] for r in reqs}) == 2
    assert len({r.segments[1] for r in reqs}) == 50
    assert ideal_prefix_hit_ratio(reqs) == pytest.approx((50 - 2) * 64 / (50 * 80))


def test_multi_turn_extends_the_previous_turn():
    cfg = SyntheticConfig(
        num_requests=8,
        num_turns=4,
        prefix_tokens=32,
        suffix_tokens=8,
        output_tokens=4,
        think_time_s=1.0,
    )
    reqs = synthetic_multi_turn(cfg)
    by_session = {}
    for r in reqs:
        by_session.setdefault(r.session_id, []).append(r)
    assert sorted(by_session) == [0, 1]
    turns = sorted(by_session[0], key=lambda r: r.turn)
    for prev, cur in zip(turns, turns[1:], strict=False):
        assert cur.segments[: len(prev.segments)] == prev.segments
        assert cur.num_input_tokens == prev.num_input_tokens + 4 + 8
        assert cur.arrival_ms - prev.arrival_ms == pytest.approx(1000.0)


@pytest.mark.skipif(not TRACES.is_dir(), reason="shared traces not present")
def test_real_mooncake_trace_matches_its_readme():
    reqs = read_mooncake(TRACES / "conversation_trace.jsonl")
    assert len(reqs) == 12031
    # README: "infinite-cache token hit rate 37.4%"
    assert ideal_prefix_hit_ratio(reqs) == pytest.approx(0.374, abs=0.0005)
    assert all(r.hash_ids[0] == 0 for r in reqs)  # every request shares block 0
