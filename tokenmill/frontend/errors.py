"""Exceptions -> OpenAI error JSON ``{"error": {"message", "type", "param", "code"}}`` and an
HTTP status, in one place (``classify``). Anything a client can cause maps to a 4xx; only
server faults are 5xx.

The status, ``type`` and ``code`` come from the error's class in ``core.errors``' registry,
the ``param`` from the error, so an error rebuilt from the wire (a worker in another
process) answers exactly as the one raised in-process. ``HttpError`` is the frontend's own
error (401, 404, 413, a 400 of the HTTP layer): it never crosses a process, and sets
the same attributes per instance. Anything else is an internal error naming only its class.
503s carry ``Retry-After``: the error's own ``retry_after_s`` (a shed request), else the
server's default.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from tokenmill.core.errors import TokenmillError, client_error

log = logging.getLogger(__name__)


class HttpError(TokenmillError):
    """An error with its own status (401, 404, 413, ...); ``code`` is the error JSON's."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.openai_code = status, type, param, code


def body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def classify(
    exc: BaseException, retry_after_s: float = 1.0
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, error JSON, extra headers) for ``exc``; ``retry_after_s`` is the default
    Retry-After of a 503. Logs server faults (500)."""
    err = exc if isinstance(exc, HttpError) else client_error(exc)
    if err.status == 500:
        log.error("internal error: %s", exc, exc_info=exc)
    headers = {}
    if err.status == 503:
        seconds = retry_after_s if err.retry_after_s is None else err.retry_after_s
        headers = {"Retry-After": str(max(1, round(seconds)))}
    return err.status, body(err.client_message(), err.type, err.param, err.openai_code), headers


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
