"""Our tokenizer and chat template must agree with vLLM's: the frontend tokenizes with ours
and sends token ids, so a disagreement would silently change every prompt.

``check_agreement`` compares, on fixed probes, the ids of plain text, the ids of rendered
chat conversations (our ``encode_chat`` against vLLM's ``apply_chat_template`` then
``encode``), the vocabulary size and the end-of-sequence ids, and raises ``ModelLoadError``
naming the first difference, so a worker refuses to start rather than serve wrong prompts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenmill.core.errors import ModelLoadError

TEXT_PROBES = (
    "Hello, world!",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Digits 1234567890 and 3.14159; unicode: café, naïve, 日本語, emoji 🙂",
    "def f(x):\n    return x ** 2  # code",
)
CHAT_PROBES = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
        {"role": "assistant", "content": "Red, green, blue."},
        {"role": "user", "content": "And three more?"},
    ],
)


def check_agreement(ours: Any, theirs: Any, their_eos_ids: Iterable[int], model: str) -> None:
    """``ours``: our ``Tokenizer``; ``theirs``: vLLM's tokenizer (``encode``,
    ``apply_chat_template`` and ``len`` as Hugging Face's); ``their_eos_ids``: the ids vLLM
    stops on. Raises ``ModelLoadError`` on the first disagreement."""

    def refuse(what: str, mine: Any, vllm: Any) -> None:
        raise ModelLoadError(
            f"{model}: tokenmill's and vLLM's {what} disagree (tokenmill {mine!r}, vLLM "
            f"{vllm!r}); the frontend tokenizes for vLLM, so the worker refuses to start"
        )

    if ours.vocab_size != len(theirs):
        refuse("vocabulary sizes", ours.vocab_size, len(theirs))
    if set(ours.eos_token_ids) != set(their_eos_ids):
        refuse("end-of-sequence ids", sorted(ours.eos_token_ids), sorted(their_eos_ids))
    for text in TEXT_PROBES:
        mine, vllm = ours.encode(text), list(theirs.encode(text, add_special_tokens=False))
        if mine != vllm:
            refuse(f"token ids of {text!r}", mine, vllm)
    if ours.chat_template is None:
        return
    for messages in CHAT_PROBES:
        mine = ours.encode_chat(messages)
        text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        vllm = list(theirs.encode(text, add_special_tokens=False))
        if mine != vllm:
            refuse(f"chat prompts of {messages!r}", mine, vllm)
