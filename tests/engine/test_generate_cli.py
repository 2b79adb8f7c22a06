"""``tokenmill generate`` end to end on a tiny HF model directory (fp32 on ``TEST_DEVICE``,
named explicitly: "auto" would pick bf16 CUDA on a GPU box while the expected answers are
computed in fp32)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.tiny_models import TEST_DEVICE

from tokenmill.engine.loader import load_model
from tokenmill.engine.reference import greedy_generate
from tokenmill.launch.cli import main

DEVICE_ARGS = ["--dtype", "fp32", "--device", TEST_DEVICE]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("smollm2")


def expected_answer(model_dir, messages, max_tokens: int) -> str:
    loaded = load_model(model_dir, dtype="fp32", device=TEST_DEVICE)
    tok = loaded.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages))
    [new] = greedy_generate(loaded.model, [ids], max_tokens, tok.eos_token_ids)
    return tok.decode(new)


def test_generate_prints_the_greedy_answer(model_dir, capsys):
    code = main(
        [
            "generate",
            "The capital of France is",
            "--model",
            str(model_dir),
            "--max-tokens",
            "12",
            *DEVICE_ARGS,
        ]
    )
    out = capsys.readouterr().out
    messages = [{"role": "user", "content": "The capital of France is"}]
    assert code == 0
    assert out == expected_answer(model_dir, messages, 12) + "\n"


def test_generate_with_system_message(model_dir, capsys):
    code = main(
        [
            "generate",
            "hi",
            "--model",
            str(model_dir),
            "--max-tokens",
            "6",
            "--system",
            "Be brief.",
            *DEVICE_ARGS,
        ]
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert code == 0
    assert capsys.readouterr().out == expected_answer(model_dir, messages, 6) + "\n"


def test_generate_raw_skips_the_template(model_dir, capsys):
    assert (
        main(
            [
                "generate",
                "def add(a, b):",
                "--model",
                str(model_dir),
                "--raw",
                "--max-tokens",
                "5",
                *DEVICE_ARGS,
            ]
        )
        == 0
    )
    loaded = load_model(model_dir, dtype="fp32", device=TEST_DEVICE)
    ids = loaded.tokenizer.encode("def add(a, b):", add_special_tokens=True)
    [new] = greedy_generate(loaded.model, [ids], 5, loaded.tokenizer.eos_token_ids)
    assert capsys.readouterr().out == loaded.tokenizer.decode(new) + "\n"


def test_missing_model_is_a_clean_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", "hi", "--model", str(missing)]) == 2
    assert capsys.readouterr().err == f"tokenmill: error: model path not found: {missing}\n"


def test_bad_max_tokens_is_a_clean_error(model_dir, capsys):
    assert main(["generate", "hi", "--model", str(model_dir), "--max-tokens", "0"]) == 2
    assert "--max-tokens must be at least 1" in capsys.readouterr().err


def test_context_overflow_is_a_clean_error(model_dir, capsys):
    assert main(["generate", "hi", "--model", str(model_dir), "--max-tokens", "100000"]) == 2
    assert "exceeds the model's context length (256)" in capsys.readouterr().err


def test_python_dash_m_tokenmill_generate(model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenmill",
            "generate",
            "hello",
            "--model",
            str(model_dir),
            "--max-tokens",
            "4",
            *DEVICE_ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": "hello"}]
    assert result.stdout == expected_answer(model_dir, messages, 4) + "\n"
