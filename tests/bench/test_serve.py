"""The runner end to end against the fake server: schedule and concurrency modes, results JSON,
PNG plots, per-worker load from /metrics, and the CLI with non-tty stdout/stderr."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
from fake_openai_server import Script

from tokenmill.bench.client import ClientConfig
from tokenmill.bench.serve import BenchError, ServeBenchConfig, run_serve_bench
from tokenmill.bench.traces import TraceRequest
from tokenmill.bench.worker_load import parse_worker_gauges

REPO = Path(__file__).resolve().parents[2]
FAST = Script(ttft_s=0.02, itl_s=0.005, num_tokens=3, cached_tokens=0)
METRICS = """\
# TYPE tokenmill_worker_active_requests gauge
tokenmill_worker_active_requests{worker_id="w0"} 2
tokenmill_worker_active_requests{worker_id="w1"} 5
# TYPE tokenmill_frontend_requests_total counter
tokenmill_frontend_requests_total 7
"""


def _requests(arrivals_ms: list[float]) -> list[TraceRequest]:
    return [TraceRequest(t, 16, 3, ((i, 16),)) for i, t in enumerate(arrivals_ms)]


async def test_schedule_mode_fires_at_arrival_over_speed(fake_server):
    server = await fake_server(lambda n, body: FAST)
    cfg = ServeBenchConfig(
        mode="schedule",
        speed=2.0,
        window_s=(0.1, 1.0),
        save_requests=True,
        progress=False,
        metrics_interval_s=0.05,
    )
    # arrivals 0 and 1200 ms fall outside the window; 100, 100, 500 -> sent at 0, 0, 0.2 s
    before = time.monotonic()
    results = await run_serve_bench(
        _requests([0, 100, 100, 500, 1200]), ClientConfig(server.url, "m"), cfg
    )
    # the saved times join a server log's time.monotonic() stamps through this origin
    first_send = results["origin_monotonic_s"] + results["requests"][0]["send_s"]
    assert before <= results["origin_monotonic_s"] <= first_send <= time.monotonic()
    sends = [r["send_s"] for r in results["requests"]]
    assert [r["scheduled_s"] for r in results["requests"]] == pytest.approx([0, 0, 0.2], abs=1e-3)
    # send lag = client overhead (aiohttp builds the request; the first one also warms up
    # imports): ~6 ms here, tens of ms on a loaded 2-core box, so allow 100 ms
    assert all(0 <= send - due < 0.1 for send, due in zip(sends, [0, 0, 0.2], strict=True))
    summary = results["summary"]
    assert summary["completed"] == 3 and summary["errors"] == {}
    assert summary["kv_reuse_ratio"] == 0.0
    assert 0 <= summary["max_send_lag_ms"] < 100
    assert results["worker_load"] == {"skipped": "GET /metrics returned HTTP 404"}


async def test_concurrency_mode_bounds_in_flight_requests(fake_server):
    in_flight, peak = 0, 0

    def script(n, body):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        asyncio.get_running_loop().call_later(0.03, _done)
        return FAST

    def _done():
        nonlocal in_flight
        in_flight -= 1

    server = await fake_server(script)
    cfg = ServeBenchConfig(mode="concurrency", concurrency=3, num_requests=9, progress=False)
    results = await run_serve_bench(_requests([5000.0] * 12), ClientConfig(server.url, "m"), cfg)
    assert len(server.served) == 9 and results["summary"]["completed"] == 9
    assert peak == 3


async def test_outputs_written_and_worker_load_sampled(fake_server, tmp_path):
    server = await fake_server(lambda n, body: FAST, metrics_text=METRICS)
    cfg = ServeBenchConfig(output_dir=tmp_path, progress=False, metrics_interval_s=0.02)
    results = await run_serve_bench(_requests([0, 50, 100]), ClientConfig(server.url, "m"), cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["completed"] == 3 and "requests" not in saved
    assert saved["worker_load"]["samples"][0]["metrics"] == {
        "tokenmill_worker_active_requests": {"w0": 2.0, "w1": 5.0}
    }
    names = sorted(Path(p).name for p in results["plots"])
    assert names == ["latency_over_time.png", "ttft_cdf.png", "worker_load.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_worker_gauges_sums_other_labels():
    text = 'x_running{worker="a",tier="gpu"} 1\nx_running{worker="a",tier="cpu"} 2\nx_running 9\n'
    assert parse_worker_gauges(text) == {"x_running": {"a": 3.0}}


async def test_unreachable_server_and_empty_window_are_clear_errors():
    with pytest.raises(BenchError, match="cannot reach http://127.0.0.1:9"):
        await run_serve_bench(
            _requests([0]),
            ClientConfig("http://127.0.0.1:9", "m"),
            ServeBenchConfig(progress=False),
        )
    with pytest.raises(BenchError, match="no requests"):
        await run_serve_bench(
            _requests([0]),
            ClientConfig("http://127.0.0.1:9", "m"),
            ServeBenchConfig(window_s=(5.0, 6.0), progress=False),
        )


def _synthetic_cli(url: str, requests: int, rate: int, prefix: int, suffix: int) -> list[str]:
    """``python -m tokenmill.launch.bench_serve_cli`` on a synthetic shared-prefix workload
    with 4 output tokens per request."""
    return [
        sys.executable,
        "-m",
        "tokenmill.launch.bench_serve_cli",
        *("--url", url, "--model", "m", "--format", "synthetic-prefix"),
        *("--synthetic-requests", str(requests), "--synthetic-rate", str(rate)),
        *("--prefix-tokens", str(prefix), "--suffix-tokens", str(suffix), "--output-tokens", "4"),
    ]


async def test_cli_with_pipes_prints_clean_json_and_no_bar_frames(fake_server, tmp_path):
    kinds = iter(["ok", "http_503"] + ["ok"] * 20)
    server = await fake_server(lambda n, body: Script(kind=next(kinds), ttft_s=0.01, itl_s=0.002))
    proc = await asyncio.create_subprocess_exec(
        *_synthetic_cli(server.url, requests=6, rate=50, prefix=32, suffix=8),
        "--output-dir",
        str(tmp_path),
        "--no-plots",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1, err.decode()  # one request failed (the 503)
    summary = json.loads(out)
    assert summary["num_requests"] == 6 and summary["errors"] == {"http_503": 1}
    assert b"\r" not in out and b"\r" not in err
    assert summary["ideal_prefix_hit_ratio"] is not None
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == summary


async def test_cli_draws_the_progress_bar_on_a_terminal(fake_server, tmp_path):
    server = await fake_server(lambda n, body: Script(ttft_s=0.01, itl_s=0.002))
    master, slave = os.openpty()  # stderr is a terminal (size 0x0: the 80x24 fallback)
    proc = await asyncio.create_subprocess_exec(
        *_synthetic_cli(server.url, requests=4, rate=100, prefix=16, suffix=4),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    bar = _read_all(master)
    assert proc.returncode == 0
    assert json.loads(out)["completed"] == 4
    assert b"bench serve: 100%" in bar and b"4/4" in bar


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO once the child's end is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_cli_registers_without_heavy_imports_and_parses_options():
    import argparse

    from tokenmill.bench import traces
    from tokenmill.launch import bench_serve_cli

    assert bench_serve_cli.FORMATS == traces.FORMATS
    parser = argparse.ArgumentParser()
    bench_serve_cli.register_serve(parser.add_subparsers(dest="sub"))
    args = parser.parse_args(
        [
            "serve",
            "--model",
            "m",
            "--trace",
            "t.jsonl",
            "--window",
            "10:20",
            "--speed",
            "2",
            "--concurrency",
            "8",
        ]
    )
    assert (args.window, args.speed, args.concurrency, args.func) == (
        (10.0, 20.0),
        2.0,
        8,
        bench_serve_cli.run,
    )
    client, bench = bench_serve_cli._configs(args)
    assert bench.mode == "concurrency" and bench.window_s == (10.0, 20.0)
    assert client.ignore_eos is True and client.endpoint == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--window", "20:10"])


async def test_cancelled_run_writes_what_finished(fake_server, tmp_path):
    third_arrived = asyncio.Event()

    def script(n, body):
        if n == 2:
            third_arrived.set()
        return Script(ttft_s=0.005, itl_s=0.001, num_tokens=2)

    server = await fake_server(script)
    cfg = ServeBenchConfig(output_dir=tmp_path, plots=False, progress=False)
    run = asyncio.create_task(
        run_serve_bench(_requests([0, 100, 200, 60_000]), ClientConfig(server.url, "m"), cfg)
    )
    await third_arrived.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["interrupted"] is True
    assert summary["num_requests"] == summary["completed"] == 2  # the 3rd was in flight
