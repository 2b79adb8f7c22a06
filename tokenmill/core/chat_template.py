"""Chat templates rendered with jinja2 exactly as transformers' ``apply_chat_template`` does.

Same environment (``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with
the ``loopcontrols`` extension), same globals (``raise_exception``, ``strftime_now``,
``namespace``, ``dict``), the same ``tojson`` filter (no HTML escaping, ``ensure_ascii=False``),
and the same variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and
the special tokens such as ``bos_token``/``eos_token``). A template compiles once per process
(cached by its source text).

Errors: no template -> ``InvalidRequestError("model has no chat template")``; the template's
``raise_exception(msg)`` or any failure while rendering -> ``InvalidRequestError`` (the client's
messages are at fault); a template that does not compile -> ``ModelLoadError``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.core.errors import InvalidRequestError, ModelLoadError

Message = Mapping[str, Any]


class _TemplateRaised(Exception):
    """What ``raise_exception`` raises inside jinja; turned into InvalidRequestError outside."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore names (no reach into CPython internals)."""

    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")
        super().__setitem__(name, value)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = dict
    return env


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template for ``source`` (cached). Raises ModelLoadError if it does not parse."""
    try:
        return _make_environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"chat template does not compile: {e} (line {e.lineno})") from None


def render_chat_template(
    template: str | None,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """The prompt text for ``messages`` (dicts with ``role`` and ``content``).

    ``special_tokens`` maps names such as ``bos_token`` to token strings; ``extra`` variables
    (``enable_thinking``, ...) are passed through to the template as transformers does.
    """
    if not template:
        raise InvalidRequestError("model has no chat template", param="messages")
    compiled = compile_template(template)
    variables = dict(special_tokens or {})
    variables.update(extra)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            documents=None if documents is None else [dict(d) for d in documents],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except _TemplateRaised as e:
        raise InvalidRequestError(f"chat template: {e}", param="messages") from None
    except (jinja2.TemplateError, TypeError, KeyError, ValueError) as e:
        raise InvalidRequestError(f"chat template failed: {e}", param="messages") from None
