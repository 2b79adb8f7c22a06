"""Workload readers for ``tokenmill bench serve`` and the offline replay.

Every reader returns a list of :class:`TraceRequest`, sorted by arrival, with ``arrival_ms``
relative to the first row of the file (so the first request arrives at 0 ms). A malformed row
raises :class:`TraceError` whose message starts with ``<file>:<line>:``.

Prompts come in two forms:

- **token ids** (Mooncake, Azure, synthetic shared-prefix, multi-turn): the prompt is a list of
  *segments* ``(seed_id, num_tokens)``; each segment expands to the first ``num_tokens`` of the
  deterministic stream :func:`mooncake_block_tokens` draws for ``seed_id``. Equal seed ids at the
  same position give equal tokens, so the prefix structure of the trace is reproduced exactly
  when the prompt is sent as token ids (``/v1/completions``).
- **text** (AIBrix): the real prompt text, sent through ``/v1/chat/completions``; the server's
  tokenizer decides the token count, so ``num_input_tokens`` is the trace's figure, not a fact.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from tokenmill.core.errors import TokenmillError

MOONCAKE_BLOCK_SIZE = 512
DEFAULT_VOCAB_SIZE = 32000  # fits Llama-2/Mistral vocabularies and the 32k-word test tokenizer
# Seed ids for synthetic segments live above 2**40 so they never collide with Mooncake's ids.
_SYNTHETIC_ID_BASE = 1 << 40
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SEED_MUL = np.uint64(0x632BE59BD9B4E019)
_MIX_MUL = np.uint64(0xBF58476D1CE4E5B9)


class TraceError(TokenmillError, ValueError):
    """A trace row that cannot be read; the message names the file and the 1-based line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload.

    ``segments`` is empty for text prompts; ``prompt_text`` is None for token-id prompts.
    ``session_id``/``turn`` are set for multi-turn workloads (turn 0 is the first).
    ``num_output_tokens`` may be 0 (some traces have such rows); senders ask for at least 1."""

    arrival_ms: float
    num_input_tokens: int
    num_output_tokens: int
    segments: tuple[tuple[int, int], ...] = ()
    prompt_text: str | None = None
    session_id: int | None = None
    turn: int = 0

    @property
    def hash_ids(self) -> tuple[int, ...]:
        """The seed id of each segment; for Mooncake rows these are the trace's hash ids."""
        return tuple(seed for seed, _ in self.segments)

    def prompt_token_ids(
        self, vocab_size: int = DEFAULT_VOCAB_SIZE, min_token_id: int = 0
    ) -> list[int]:
        """The prompt as token ids (``num_input_tokens`` of them). Raises ValueError for a
        text-prompt request."""
        if not self.segments:
            raise ValueError("this request has a text prompt, not token ids")
        parts = [mooncake_block_tokens(s, n, vocab_size, min_token_id) for s, n in self.segments]
        return np.concatenate(parts).tolist()


def mooncake_block_tokens(
    hash_id: int,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_token_id: int = 0,
) -> np.ndarray:
    """The deterministic block of ``block_size`` token ids for one Mooncake hash id:
    row 0 of :func:`mooncake_tokens`. Returns int64 array [block_size]."""
    return mooncake_tokens(
        np.array([hash_id], dtype=np.uint64), block_size, vocab_size, min_token_id
    )[0]


def mooncake_tokens(
    hash_ids: np.ndarray,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_token_id: int = 0,
) -> np.ndarray:
    """The token blocks of ``hash_ids`` (uint64 array [n]), all in one vector pass.

    This is THE hash-id -> tokens mapping: the offline replay (``tokenmill replay``: its
    ``TraceTokens`` calls this) and ``tokenmill bench serve`` produce the same tokens, so that
    online and offline runs see the same prompts and the same prefix-cache hits.

    Definition (reproducible in any language; all arithmetic mod 2**64 on unsigned ints):
    ``x = (hash_id + 1) * 0x632BE59BD9B4E019 + i * 0x9E3779B97F4A7C15`` for position ``i``,
    ``x = (x ^ (x >> 29)) * 0xBF58476D1CE4E5B9``, ``x = x ^ (x >> 32)``; token ``i`` is
    ``min_token_id + x % (vocab_size - min_token_id)``. Same id, same tokens; a shorter
    ``block_size`` gives a prefix of a longer one (so the last, partial block of a prompt is the
    full block cut to length). A ``vocab_size`` <= 257 keeps the ids CPython's shared small
    ints after ``.tolist()`` (the replay relies on it). Returns int64 array [n, block_size].
    """
    if not 0 <= min_token_id < vocab_size:
        raise ValueError(f"need 0 <= min_token_id < vocab_size, got {min_token_id}, {vocab_size}")
    positions = np.arange(block_size, dtype=np.uint64) * _GAMMA  # [block_size]
    with np.errstate(over="ignore"):
        x = (hash_ids[:, None] + np.uint64(1)) * _SEED_MUL + positions  # [n, block_size]
        x = (x ^ (x >> np.uint64(29))) * _MIX_MUL
        x ^= x >> np.uint64(32)
    tokens = (x % np.uint64(vocab_size - min_token_id)).astype(np.int64)  # [n, block_size]
    return tokens + min_token_id if min_token_id else tokens


def _fail(path: Path, line: int, why: str) -> TraceError:
    return TraceError(f"{path}:{line}: {why}")


def _int_field(row: dict, key: str, path: Path, line: int, minimum: int = 0) -> int:
    value = row.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _fail(path, line, f"{key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _json_rows(path: Path):
    """Yields (line number, dict) for each non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise _fail(path, line_no, f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise _fail(path, line_no, "expected a JSON object")
            yield line_no, row


def _check_order(path: Path, line: int, previous_ms: float | None, now_ms: float) -> None:
    if previous_ms is not None and now_ms < previous_ms:
        raise _fail(path, line, f"timestamp {now_ms} is earlier than the previous row's")


def _rebase(requests: list[TraceRequest]) -> list[TraceRequest]:
    """Shifts arrivals so the first request arrives at 0 ms."""
    if not requests:
        return requests
    t0 = requests[0].arrival_ms
    return [_replace_arrival(r, r.arrival_ms - t0) for r in requests]


def _replace_arrival(request: TraceRequest, arrival_ms: float) -> TraceRequest:
    return replace(request, arrival_ms=arrival_ms)


def _mooncake_row(row: dict, path: Path, line: int) -> TraceRequest:
    ts = row.get("timestamp")
    if not isinstance(ts, int | float) or isinstance(ts, bool) or ts < 0:
        raise _fail(path, line, f"'timestamp' must be a number >= 0, got {ts!r}")
    num_in = _int_field(row, "input_length", path, line, minimum=1)
    num_out = _int_field(row, "output_length", path, line)
    ids = row.get("hash_ids")
    if not isinstance(ids, list) or not all(isinstance(h, int) and h >= 0 for h in ids):
        raise _fail(path, line, "'hash_ids' must be a list of non-negative integers")
    if len(ids) != math.ceil(num_in / MOONCAKE_BLOCK_SIZE):
        raise _fail(
            path,
            line,
            f"{len(ids)} hash_ids for input_length {num_in} (need "
            f"ceil({num_in}/{MOONCAKE_BLOCK_SIZE}))",
        )
    sizes = [MOONCAKE_BLOCK_SIZE] * len(ids)
    sizes[-1] = num_in - MOONCAKE_BLOCK_SIZE * (len(ids) - 1)
    return TraceRequest(float(ts), num_in, num_out, tuple(zip(ids, sizes, strict=True)))


def read_mooncake(path: str | Path, max_requests: int | None = None) -> list[TraceRequest]:
    """Mooncake JSONL: ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``; the
    first ``max_requests`` rows (all when None). The one Mooncake parser: ``tokenmill replay``
    (``tokenmill/sim/trace.py``) reads traces through it."""
    path = Path(path)
    out: list[TraceRequest] = []
    rows = _json_rows(path) if max_requests != 0 else iter(())
    for line, row in rows:
        request = _mooncake_row(row, path, line)
        _check_order(path, line, out[-1].arrival_ms if out else None, request.arrival_ms)
        out.append(request)
        if len(out) == max_requests:
            break
    return _rebase(out)


def _azure_time_ms(text: str) -> float:
    """``2023-11-16 18:15:46.6805900`` (100 ns digits) -> ms since the epoch (naive, UTC)."""
    whole, _, frac = text.strip().partition(".")
    seconds = datetime.fromisoformat(whole).timestamp()
    return seconds * 1e3 + (int(frac) / 10 ** len(frac) * 1e3 if frac else 0.0)


def _azure_row(row: list[str], index: int, path: Path, line: int) -> TraceRequest:
    if len(row) != 3:
        raise _fail(
            path,
            line,
            f"expected 3 columns TIMESTAMP,ContextTokens,GeneratedTokens, got {len(row)}",
        )
    try:
        arrival = _azure_time_ms(row[0])
        num_in, num_out = int(row[1]), int(row[2])
    except ValueError as e:
        raise _fail(path, line, f"bad value ({e})") from None
    if num_in < 1 or num_out < 0:
        raise _fail(
            path, line, f"need ContextTokens >= 1 and GeneratedTokens >= 0, got {num_in}, {num_out}"
        )
    # Azure has no prefix information: one unique segment per request, no sharing.
    return TraceRequest(arrival, num_in, num_out, ((_SYNTHETIC_ID_BASE + index, num_in),))


def read_azure(path: str | Path) -> list[TraceRequest]:
    """Azure CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``; wall-clock timestamps become ms
    offsets from the first row. Prompts are unique random token ids (the trace has no text)."""
    path = Path(path)
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8", newline="") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header is None or [h.strip() for h in header] != [
            "TIMESTAMP",
            "ContextTokens",
            "GeneratedTokens",
        ]:
            raise _fail(
                path, 1, f"expected header TIMESTAMP,ContextTokens,GeneratedTokens, got {header!r}"
            )
        for line, row in enumerate(rows, start=2):
            request = _azure_row(row, len(out), path, line)
            _check_order(path, line, out[-1].arrival_ms if out else None, request.arrival_ms)
            out.append(request)
    return _rebase(out)


def _aibrix_request(item: object, ts: float, path: Path, line: int) -> TraceRequest:
    if not isinstance(item, dict):
        raise _fail(path, line, "each entry of 'requests' must be an object")
    num_in = _int_field(item, "Prompt Length", path, line, minimum=1)
    num_out = _int_field(item, "Output Length", path, line)
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _fail(path, line, "'prompt' must be a non-empty string")
    return TraceRequest(ts, num_in, num_out, prompt_text=prompt)


def read_aibrix(path: str | Path) -> list[TraceRequest]:
    """AIBrix JSONL: ``{"timestamp": ms, "requests": [{"Prompt Length", "Output Length",
    "prompt"}, ...]}``; every request of a line arrives at that line's timestamp."""
    path = Path(path)
    out: list[TraceRequest] = []
    previous: float | None = None
    for line, row in _json_rows(path):
        ts = row.get("timestamp")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or ts < 0:
            raise _fail(path, line, f"'timestamp' must be a number >= 0, got {ts!r}")
        items = row.get("requests")
        if not isinstance(items, list) or not items:
            raise _fail(path, line, "'requests' must be a non-empty list")
        _check_order(path, line, previous, float(ts))
        previous = float(ts)
        out.extend(_aibrix_request(item, float(ts), path, line) for item in items)
    return _rebase(out)


@dataclass(frozen=True, slots=True)
class SyntheticConfig:
    """Synthetic workloads. Arrivals are Poisson at ``request_rate`` (req/s, seeded).

    shared-prefix: ``num_groups`` groups; each prompt is its group's ``prefix_tokens`` followed
    by ``suffix_tokens`` unique tokens.
    multi-turn: ``num_requests // num_turns`` conversations of ``num_turns`` turns; turn k's prompt
    is turn k-1's prompt + a synthetic assistant reply of ``output_tokens`` + ``suffix_tokens``
    new user tokens, and arrives ``think_time_s`` after turn k-1 (open loop: it does not wait for
    the reply; the reply tokens are synthetic, not the server's, as in the offline replay)."""

    num_requests: int = 200
    request_rate: float = 10.0
    num_groups: int = 8
    prefix_tokens: int = 1024
    suffix_tokens: int = 128
    output_tokens: int = 64
    num_turns: int = 4
    think_time_s: float = 5.0
    seed: int = 0


def _poisson_arrivals_ms(n: int, rate: float, rng: random.Random) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        out.append(t * 1e3)
        t += rng.expovariate(rate)
    return out


def synthetic_shared_prefix(cfg: SyntheticConfig) -> list[TraceRequest]:
    """See :class:`SyntheticConfig`; group of request i is drawn uniformly (seeded)."""
    rng = random.Random(cfg.seed)
    base = _SYNTHETIC_ID_BASE * 2 + cfg.seed * (1 << 32)
    out = []
    for i, t in enumerate(_poisson_arrivals_ms(cfg.num_requests, cfg.request_rate, rng)):
        group = rng.randrange(cfg.num_groups)
        segments = (
            (base + group, cfg.prefix_tokens),
            (base + cfg.num_groups + i, cfg.suffix_tokens),
        )
        num_in = cfg.prefix_tokens + cfg.suffix_tokens
        out.append(TraceRequest(t, num_in, cfg.output_tokens, segments))
    return out


def synthetic_multi_turn(cfg: SyntheticConfig) -> list[TraceRequest]:
    """See :class:`SyntheticConfig`; returned sorted by arrival."""
    rng = random.Random(cfg.seed)
    base = _SYNTHETIC_ID_BASE * 3 + cfg.seed * (1 << 32)
    num_sessions = max(1, cfg.num_requests // cfg.num_turns)
    out = []
    for s, start in enumerate(_poisson_arrivals_ms(num_sessions, cfg.request_rate, rng)):
        segments: tuple[tuple[int, int], ...] = ((base + 2 * s * cfg.num_turns, cfg.prefix_tokens),)
        for k in range(cfg.num_turns):
            if k:
                reply = (base + 2 * s * cfg.num_turns + 2 * k, cfg.output_tokens)
                user = (base + 2 * s * cfg.num_turns + 2 * k + 1, cfg.suffix_tokens)
                segments = (*segments, reply, user)
            num_in = sum(n for _, n in segments)
            arrival = start + k * cfg.think_time_s * 1e3
            out.append(TraceRequest(arrival, num_in, cfg.output_tokens, segments, None, s, k))
    return sorted(out, key=lambda r: r.arrival_ms)


FORMATS = ("mooncake", "azure", "aibrix", "synthetic-prefix", "multi-turn")


def load_workload(
    fmt: str, path: str | Path | None, synthetic: SyntheticConfig
) -> list[TraceRequest]:
    """Reads ``path`` in ``fmt`` (one of :data:`FORMATS`); synthetic formats ignore ``path``."""
    readers = {"mooncake": read_mooncake, "azure": read_azure, "aibrix": read_aibrix}
    if fmt in readers:
        if path is None:
            raise TraceError(f"--format {fmt} needs --trace FILE")
        if not Path(path).is_file():
            raise TraceError(f"{path}: no such trace file")
        return readers[fmt](path)
    if fmt == "synthetic-prefix":
        return synthetic_shared_prefix(synthetic)
    if fmt == "multi-turn":
        return synthetic_multi_turn(synthetic)
    raise TraceError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")


def select_window(
    requests: list[TraceRequest], start_s: float = 0.0, end_s: float | None = None
) -> list[TraceRequest]:
    """Requests with ``start_s <= arrival < end_s`` (seconds), rebased so ``start_s`` is 0."""
    lo, hi = start_s * 1e3, math.inf if end_s is None else end_s * 1e3
    return [_replace_arrival(r, r.arrival_ms - lo) for r in requests if lo <= r.arrival_ms < hi]


def ideal_prefix_hit_ratio(requests: list[TraceRequest]) -> float | None:
    """Token hit rate of an infinite prefix cache keyed by the leading segments (chained ids:
    a segment hits when it and every segment before it were seen at the same position before).
    None for text prompts. For Mooncake this is the trace README's "infinite-cache token hit
    rate"; compare it with the server's reported cached-token ratio."""
    if not requests or not requests[0].segments:
        return None
    seen: set[int] = set()
    hit = total = 0
    for r in requests:
        total += r.num_input_tokens
        key, matching = 0, True
        for seg in r.segments:
            key = hash((key, seg))  # chained: equal keys mean equal prefixes
            matching = matching and key in seen
            hit += seg[1] if matching else 0
            seen.add(key)
    return hit / total if total else None
