"""The ``tokenmill bench serve`` runner: replays a workload against an OpenAI-compatible server
over HTTP and writes JSON results and PNG plots.

Modes:
- **schedule** (open loop): request i is sent at ``arrival_i / speed`` seconds after the start,
  whatever the server's state. Requests with equal timestamps (Mooncake's ~3 s buckets) are
  fired together as a burst, not spread. ``window`` keeps arrivals in ``[start, end)`` seconds of
  the trace (before the speed factor) and shifts them so the window starts at 0.
- **concurrency** (closed loop): ``concurrency`` workers each send the next request as soon as
  their previous one ends, until ``num_requests`` (default: all) have been sent; timestamps are
  ignored (``window`` still selects which requests are sent).

The summary is :func:`tokenmill.bench.metrics.summarize` (the offline replay's definitions) plus
client-side facts: ``client_cpu_s`` (CPU time of this process during the run),
``max_send_lag_ms`` (how late the client fired scheduled requests; large values mean the client,
not the server, limited the run) and ``ideal_prefix_hit_ratio``: the infinite-cache token hit
rate of the completed requests in send order. A server with a big enough prefix cache reports
exactly this as ``kv_reuse_ratio`` when the prompts reproduce the trace's prefix sharing
(measured: tokenmill's mocker server, Mooncake 0-30 s at 4x: 0.126892 both).
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from tqdm import tqdm

from tokenmill.bench import plots
from tokenmill.bench.client import (
    ClientConfig,
    HttpClient,
    RequestRecord,
    encode_request,
    request_body,
    send_request,
)
from tokenmill.bench.metrics import SlaConfig, summarize
from tokenmill.bench.traces import TraceRequest, ideal_prefix_hit_ratio, select_window
from tokenmill.bench.worker_load import DEFAULT_PATTERN, WorkerLoadSampler
from tokenmill.core.errors import TokenmillError

SendFn = Callable[
    [int, TraceRequest, float | None, tuple[str, bytes] | None], Awaitable[RequestRecord]
]


class BenchError(TokenmillError):
    """A benchmark that cannot start (unreachable server, empty workload, bad option)."""


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    """``mode``: "schedule" or "concurrency". ``num_requests`` caps the requests taken (after
    the window) in both modes. ``output_dir``: where results.json and the PNGs go (None: no
    files). ``progress``: True/False, or None to show the bar only when stderr is a terminal."""

    mode: str = "schedule"
    speed: float = 1.0
    window_s: tuple[float, float | None] = (0.0, None)
    concurrency: int = 1
    num_requests: int | None = None
    sla: SlaConfig = field(default_factory=SlaConfig)
    output_dir: Path | None = None
    save_requests: bool = False
    plots: bool = True
    metrics_interval_s: float = 1.0
    worker_metric_pattern: str = DEFAULT_PATTERN
    worker_metric: str | None = None
    progress: bool | None = None
    check_server: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("schedule", "concurrency"):
            raise BenchError(f"mode must be 'schedule' or 'concurrency', got {self.mode!r}")
        if self.speed <= 0 or self.concurrency < 1:
            raise BenchError(
                f"need speed > 0 and concurrency >= 1, got {self.speed}, {self.concurrency}"
            )


def select_requests(requests: list[TraceRequest], cfg: ServeBenchConfig) -> list[TraceRequest]:
    """The requests a run sends, in order: those in the window, then the first
    ``num_requests`` of them (both modes; concurrency mode then ignores their timestamps)."""
    requests = select_window(requests, *cfg.window_s)
    if cfg.num_requests is not None:
        requests = requests[: cfg.num_requests]
    if not requests:
        raise BenchError("the workload has no requests to send (check --window/--num-requests)")
    return requests


LOOKAHEAD_S = 5.0  # schedule mode encodes requests due within this many seconds while idle


async def _run_schedule(
    send: SendFn,
    requests: list[TraceRequest],
    speed: float,
    origin_s: float,
    encode: Callable[[TraceRequest], tuple[str, bytes]],
) -> list[RequestRecord]:
    """Fires request i at ``origin_s + arrival_i / speed``. While waiting it encodes the
    requests due in the next LOOKAHEAD_S, so a burst goes out without encoding delays."""
    due = [origin_s + r.arrival_ms / 1e3 / speed for r in requests]
    encoded: dict[int, tuple[str, bytes]] = {}
    ahead = 0
    tasks: list[asyncio.Task] = []
    now = time.perf_counter
    try:
        for i, request in enumerate(requests):
            while ahead < len(requests) and now() < due[i] and due[ahead] < now() + LOOKAHEAD_S:
                encoded[ahead] = encode(requests[ahead])
                ahead += 1
                await asyncio.sleep(0)  # let streams in flight be read between encodings
            if due[i] > now():
                await asyncio.sleep(due[i] - now())
            # not encoded yet (no idle time before it): send_request encodes it now
            tasks.append(asyncio.create_task(send(i, request, due[i], encoded.pop(i, None))))
        return list(await asyncio.gather(*tasks))
    except asyncio.CancelledError:
        for task in tasks:  # requests in flight die with the run
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _run_concurrency(
    send: SendFn,
    requests: list[TraceRequest],
    concurrency: int,
) -> list[RequestRecord]:
    records: list[RequestRecord | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))

    async def worker() -> None:
        for i in next_index:  # the shared iterator hands each index to exactly one worker
            records[i] = await send(i, requests[i], None, None)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return [r for r in records if r is not None]


async def _check_server(client: HttpClient) -> None:
    try:
        await client.get_text("/v1/models", timeout_s=10.0)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise BenchError(f"cannot reach {client.base_url}: {e!r}") from None


def _progress(total: int, enabled: bool | None) -> tqdm:
    # disable=None lets tqdm switch itself off when stderr is not a terminal, so piped or
    # logged output never gets carriage-return bar frames. shutil's size falls back to 80x24
    # where a terminal reports 0x0 (tqdm would then draw nothing).
    size = shutil.get_terminal_size()
    disable = None if enabled is None else not enabled
    return tqdm(
        total=total,
        unit="req",
        file=sys.stderr,
        disable=disable,
        ncols=size.columns,
        nrows=size.lines,
        desc="bench serve",
    )


async def run_serve_bench(
    requests: list[TraceRequest], client_cfg: ClientConfig, cfg: ServeBenchConfig
) -> dict:
    """Runs the benchmark; returns the results dict (see :func:`build_results`) and, when
    ``cfg.output_dir`` is set, writes results.json and the plots there. Cancelled (Ctrl-C), it
    stops sending, writes the results of the requests that finished (``summary.interrupted``
    is true) and re-raises the cancellation."""
    requests = select_requests(requests, cfg)
    try:
        request_body(requests[0], client_cfg)
    except ValueError as e:
        raise BenchError(str(e)) from None
    async with HttpClient(client_cfg) as client:
        if cfg.check_server:
            await _check_server(client)
        origin, cpu0 = time.perf_counter(), time.process_time()
        sampler = WorkerLoadSampler(
            client, origin, cfg.metrics_interval_s, cfg.worker_metric_pattern
        )
        sampler_task = asyncio.create_task(sampler.run())
        finished: list[RequestRecord] = []
        try:
            await _drive(client, requests, client_cfg, cfg, origin, finished)
        except asyncio.CancelledError:  # Ctrl-C: keep what finished, then stop
            _finish(requests, finished, origin, cpu0, client_cfg, cfg, sampler, interrupted=True)
            raise
        finally:
            sampler.stop()
            await sampler_task
    return _finish(requests, finished, origin, cpu0, client_cfg, cfg, sampler, interrupted=False)


def _finish(requests, finished, origin, cpu0, client_cfg, cfg, sampler, interrupted) -> dict:
    records = sorted(finished, key=lambda r: r.index)
    results = build_results(requests, records, origin, client_cfg, cfg, sampler.report())
    # the client shares the machine with the server in most tests: say what it cost
    results["summary"]["client_cpu_s"] = time.process_time() - cpu0
    results["summary"]["interrupted"] = interrupted
    if cfg.output_dir is not None:
        write_outputs(results, records, origin, cfg)
    return results


async def _drive(client, requests, client_cfg, cfg, origin, finished: list) -> None:
    """Sends the requests; appends each record to ``finished`` as it completes."""
    bar = _progress(len(requests), cfg.progress)
    failed = 0

    async def send(i: int, request: TraceRequest, due: float | None, encoded) -> RequestRecord:
        nonlocal failed
        record = await send_request(client, request, i, client_cfg, due, encoded)
        finished.append(record)
        failed += record.error is not None
        bar.set_postfix(errors=failed, refresh=False)
        bar.update(1)
        return record

    try:
        if cfg.mode == "schedule":
            encode = functools.partial(encode_request, cfg=client_cfg)
            await _run_schedule(send, requests, cfg.speed, origin, encode)
        else:
            await _run_concurrency(send, requests, cfg.concurrency)
    finally:
        bar.close()


def _record_json(record: RequestRecord, origin: float) -> dict:
    shift = lambda t: None if t is None else t - origin  # noqa: E731
    return {
        "index": record.index,
        "scheduled_s": shift(record.scheduled_s),
        "send_s": record.send_s - origin,
        "first_token_s": shift(record.first_token_s),
        "chunk_times_s": [t - origin for t in record.chunk_times_s],
        "end_s": record.end_s - origin,
        "num_output_tokens": record.num_output_tokens,
        "num_prompt_tokens": record.num_prompt_tokens,
        "num_cached_tokens": record.num_cached_tokens,
        "error": record.error,
        "error_detail": record.error_detail,
        "response_id": record.response_id,
    }


def _config_json(client_cfg: ClientConfig, cfg: ServeBenchConfig) -> dict:
    client = {k: v for k, v in asdict(client_cfg).items() if k != "api_key"}
    serve = {k: v for k, v in asdict(cfg).items() if k != "output_dir"}
    serve["output_dir"] = None if cfg.output_dir is None else str(cfg.output_dir)
    return {"client": client, "bench": serve}


def build_results(
    requests: list[TraceRequest],
    records: list[RequestRecord],
    origin: float,
    client_cfg: ClientConfig,
    cfg: ServeBenchConfig,
    worker_load: dict,
) -> dict:
    """``{"config", "summary", "worker_load", "requests"?}``; times in seconds from the start,
    latencies in ms."""
    timings = [r.timing(origin) for r in records]
    duration = max((r.end_s for r in records), default=origin) - origin
    summary = summarize(timings, duration, cfg.sla)
    lags = [r.send_s - r.scheduled_s for r in records if r.scheduled_s is not None]
    summary["max_send_lag_ms"] = max(lags) * 1e3 if lags else None
    completed = [
        requests[r.index] for r in sorted(records, key=lambda r: r.send_s) if r.timing().ok
    ]
    summary["ideal_prefix_hit_ratio"] = ideal_prefix_hit_ratio(completed)
    summary["num_requests_selected"] = len(requests)  # more than num_requests if interrupted
    summary["mean_input_tokens_trace"] = sum(r.num_input_tokens for r in requests) / len(requests)
    results = {
        "config": _config_json(client_cfg, cfg),
        "summary": summary,
        "worker_load": worker_load,
    }
    if cfg.save_requests:
        results["requests"] = [_record_json(r, origin) for r in records]
        # the start as time.monotonic(): joins the records with a same-host server's log
        results["origin_monotonic_s"] = origin + time.monotonic() - time.perf_counter()
    return results


def write_outputs(
    results: dict, records: list[RequestRecord], origin: float, cfg: ServeBenchConfig
) -> list[Path]:
    """Writes results.json and (unless ``cfg.plots`` is False) the PNGs; returns the paths."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path | None] = []
    if cfg.plots:
        try:
            paths = _plot_all(results, records, origin, cfg, out)
        except ImportError as e:  # matplotlib is optional for the runner itself
            results["plots_skipped"] = f"matplotlib not importable: {e}"
    written = [p for p in paths if p is not None]
    results["plots"] = [str(p) for p in written]
    with open(out / "results.json", "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
        fh.write("\n")
    return [out / "results.json", *written]


def _plot_all(
    results: dict, records: list[RequestRecord], origin: float, cfg: ServeBenchConfig, out: Path
) -> list[Path | None]:
    timings = [r.timing(origin) for r in records]
    return [
        plots.plot_ttft_cdf(timings, out / "ttft_cdf.png"),
        plots.plot_latency_over_time(timings, out / "latency_over_time.png"),
        plots.plot_worker_load(results["worker_load"], out / "worker_load.png", cfg.worker_metric),
    ]
