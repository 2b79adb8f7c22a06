"""``EngineBenchConfig(only_single=True)``: reruns the single stream and merges it into an
existing results file without touching the throughput entries."""

from __future__ import annotations

import json

import pytest

from tokenmill.bench.engine import DEFAULT_TRACE, EngineBenchConfig, _merge_single, run


def test_merge_single_keeps_static_batch_and_throughput_ratio():
    run_ = {
        "transformers": {"static_batch": {"output_tok_s": 3.0}},
        "ratios": {"throughput_vs_transformers": 3.08, "single_stream_decode_vs_transformers": 1.0},
        "tokenmill": [{"output_tok_s": 9.0}],
    }
    single = {
        "single_stream_runs": {"tokenmill": [], "transformers": []},
        "single_stream": {"decode_tok_s": 15.0},
        "transformers": {"single_stream": {"decode_tok_s": 10.0}},
    }
    _merge_single(run_, single)
    assert run_["transformers"] == {
        "static_batch": {"output_tok_s": 3.0},
        "single_stream": {"decode_tok_s": 10.0},
    }
    assert run_["ratios"] == {
        "throughput_vs_transformers": 3.08,
        "single_stream_decode_vs_transformers": 1.5,
    }
    assert run_["tokenmill"] == [{"output_tok_s": 9.0}]
    assert run_["single_stream"] == {"decode_tok_s": 15.0}


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_TRACE.exists(), reason="the AIBrix trace is not on this machine")
def test_only_single_rewrites_single_stream_entries_only(tmp_path, tiny_model_dir):
    out = tmp_path / "engine.json"
    throughput = {"output_tok_s": 1.0, "concurrency": 32}
    out.write_text(json.dumps({"config": {"x": 1}, "runs": {"fp32": {"tokenmill": [throughput]}}}))
    cfg = EngineBenchConfig(
        model=str(tiny_model_dir("smollm2")),
        dtypes=("fp32",),
        num_requests=2,
        single_prompt_tokens=16,
        single_output_tokens=4,
        threads=1,
        out=out,
        only_single=True,
    )
    run(cfg)
    result = json.loads(out.read_text())
    entry = result["runs"]["fp32"]
    assert result["config"] == {"x": 1}
    assert entry["tokenmill"] == [throughput]
    assert entry["single_stream"]["output_tokens"] == 4
    assert len(entry["single_stream_runs"]["transformers"]) == 3
    assert set(entry["ratios"]) == {"single_stream_decode_vs_transformers"}
    assert entry["decode_profile"]["steps"] == 12
    assert entry["single_stream_rerun"]["machine"]["torch_threads"] == 1
