"""Latency and throughput metrics, shared by ``tokenmill bench serve`` (online, over HTTP) and
``tokenmill replay`` (offline, virtual clock): both build :class:`RequestTiming` records and call
:func:`summarize`, so their reports use the same definitions by construction. Pure Python, no
I/O, no clock: times are plain floats in seconds on any common time base.

Definitions (one request):
  TTFT = first_token_s - arrival_s   (includes any queueing at the server; online, arrival is
                                      the moment the client sent the request)
  E2E  = end_s - arrival_s           (end: online the end of the stream, offline the finish)
  ITL  = (last_token_s - first_token_s) / (num_output_tokens - 1), the mean gap between the
         request's output tokens; undefined (excluded) for requests with < 2 output tokens.
Aggregates: the ``ttft``/``itl``/``e2e`` objects hold mean, p50, p90, p99 in milliseconds over
successful requests, percentiles by linear interpolation between closest ranks (numpy's default
"linear" method). ITL's mean is the mean over requests of each request's mean gap.
Goodput: requests with TTFT <= ``SlaConfig.ttft_ms`` and ITL <= ``SlaConfig.itl_ms``.
KV reuse: cached prompt tokens / prompt tokens (:func:`cached_token_ratio`).

No data is None (JSON null), never 0.0: an empty distribution, a rate over a zero duration, a
fraction of no requests, a reuse ratio nobody reported. This is the one implementation of
these definitions; ``tokenmill/sim/report.py`` converts its records to :class:`RequestTiming`
and rounds the result, nothing else.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """What the metrics need from one request. ``error`` is None for a success, else a kind
    such as ``http_503``, ``timeout``, ``connection``, ``sse_error``, ``no_tokens``.
    ``num_cached_tokens`` is None when the server did not report it."""

    arrival_s: float
    first_token_s: float | None
    last_token_s: float | None
    end_s: float
    num_output_tokens: int
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token_s is not None


@dataclass(frozen=True, slots=True)
class SlaConfig:
    """Goodput thresholds: a request is *good* when it succeeded, its TTFT <= ``ttft_ms`` and
    its ITL <= ``itl_ms`` (a request with one output token has no ITL and passes that check)."""

    ttft_ms: float = 2000.0
    itl_ms: float = 25.0


def ttft_s(t: RequestTiming) -> float:
    assert t.first_token_s is not None, "TTFT of a request without tokens"
    return t.first_token_s - t.arrival_s


def e2e_s(t: RequestTiming) -> float:
    return t.end_s - t.arrival_s


def itl_s(t: RequestTiming) -> float | None:
    """Mean gap between the request's output tokens; None with fewer than 2 tokens."""
    if t.num_output_tokens < 2 or t.first_token_s is None or t.last_token_s is None:
        return None
    return (t.last_token_s - t.first_token_s) / (t.num_output_tokens - 1)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks: rank ``p/100 * (n-1)`` (numpy "linear")."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = p / 100.0 * (len(sorted_values) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def distribution(values: Iterable[float]) -> dict[str, float | None]:
    """``{"mean", "p50", "p90", "p99"}`` of ``values``, in their own unit; all None for no
    values (no data is not a measurement of 0: JSON null, never 0.0)."""
    xs = sorted(values)
    if not xs:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": math.fsum(xs) / len(xs), **{f"p{p}": percentile(xs, p) for p in PERCENTILES}}


def distribution_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """:func:`distribution` of seconds, reported in ms."""
    return distribution(v * 1e3 for v in values_s)


def is_good(t: RequestTiming, sla: SlaConfig) -> bool:
    if not t.ok or ttft_s(t) * 1e3 > sla.ttft_ms:
        return False
    itl = itl_s(t)
    return itl is None or itl * 1e3 <= sla.itl_ms


def errors_by_kind(timings: Iterable[RequestTiming]) -> dict[str, int]:
    """Counts of failed requests per error kind, sorted by kind."""
    counts = Counter(t.error or "no_tokens" for t in timings if not t.ok)
    return dict(sorted(counts.items()))


def cached_token_ratio(timings: Iterable[RequestTiming]) -> float | None:
    """Reported cached prompt tokens / prompt tokens over successful requests that report both;
    None when no request reports cached tokens."""
    cached = prompt = 0
    for t in timings:
        if t.ok and t.num_cached_tokens is not None and t.num_prompt_tokens:
            cached += t.num_cached_tokens
            prompt += t.num_prompt_tokens
    return cached / prompt if prompt else None


def summarize(
    timings: Sequence[RequestTiming], duration_s: float, sla: SlaConfig = SlaConfig()
) -> dict:
    """The report both tools print; key names follow ``tokenmill replay``'s report
    (``tokenmill/sim/report.py``). ``duration_s`` is the run's wall (or virtual) time, the
    denominator of every rate. Rates count successful requests and their output tokens.
    ``kv_reuse_ratio`` is :func:`cached_token_ratio` (None when the server reports no cached
    tokens); empty distributions are None, never 0."""
    ok = [t for t in timings if t.ok]
    num_good = sum(is_good(t, sla) for t in ok)
    num_out = sum(t.num_output_tokens for t in ok)
    rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    return {
        "num_requests": len(timings),
        "completed": len(ok),
        "failed": len(timings) - len(ok),
        "duration_s": duration_s,
        "requests_per_s": rate(len(ok)),
        "output_tokens": num_out,
        "output_tokens_per_s": rate(num_out),
        "ttft": distribution_ms(ttft_s(t) for t in ok),
        "itl": distribution_ms(v for v in (itl_s(t) for t in ok) if v is not None),
        "e2e": distribution_ms(e2e_s(t) for t in ok),
        "goodput": {
            "sla_ttft_ms": sla.ttft_ms,
            "sla_itl_ms": sla.itl_ms,
            "requests": num_good,
            "fraction": num_good / len(timings) if timings else None,
            "requests_per_s": rate(num_good),
        },
        "errors": errors_by_kind(timings),
        "kv_reuse_ratio": cached_token_ratio(timings),
    }
