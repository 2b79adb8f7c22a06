"""``needs_tokenizer``: which requests the app hands to its tokenizer thread pool."""

from __future__ import annotations

import pytest

from tokenmill.frontend.preprocess import needs_tokenizer
from tokenmill.frontend.schemas import ChatCompletionRequest, CompletionRequest, decode_request


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ('"hello"', True),
        (' [ "a", "b"]', True),
        ("[1, 2, 3]", False),
        ("[[1], [2, 3]]", False),
        ("7", False),
        ("null", False),
    ],
)
def test_only_text_prompts_need_the_tokenizer(prompt, expected):
    body = f'{{"model": "m", "prompt": {prompt}}}'.encode()
    assert needs_tokenizer(decode_request(body, CompletionRequest)) is expected


def test_chat_needs_the_tokenizer():
    req = ChatCompletionRequest(model="m", messages=[])
    assert needs_tokenizer(req) is True
