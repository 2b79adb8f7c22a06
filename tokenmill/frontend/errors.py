"""Exceptions -> OpenAI error JSON ``{"error": {"message", "type", "param", "code"}}`` and an
HTTP status. Anything a client can cause maps to a 4xx; only server faults are 5xx."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from tokenmill.core.errors import (
    EngineDeadError,
    InvalidRequestError,
    OverloadedError,
    RequestAbortedError,
    TokenmillError,
)
from tokenmill.runtime.interface import (
    DeadlineExceededError,
    InstanceFailedError,
    NoInstancesError,
)

log = logging.getLogger(__name__)


class HttpError(TokenmillError):
    """An error with its own status (401, 404, 413, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code


def body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def classify(
    exc: BaseException, retry_after_s: float = 1.0
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, error JSON, extra headers) for ``exc``."""
    retry = {"Retry-After": str(max(1, round(retry_after_s)))}
    if isinstance(exc, HttpError):
        return exc.status, body(str(exc), exc.type, exc.param, exc.code), {}
    if isinstance(exc, InvalidRequestError):
        return 400, body(str(exc), "invalid_request_error", exc.param, exc.code), {}
    if isinstance(exc, OverloadedError):
        retry = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        return 503, body(str(exc), "overloaded_error", None, "overloaded"), retry
    if isinstance(exc, NoInstancesError | InstanceFailedError | EngineDeadError | RequestAbortedError):
        return 503, body(str(exc), "service_unavailable", None, "service_unavailable"), retry
    if isinstance(exc, DeadlineExceededError):
        return 504, body(str(exc), "timeout_error", None, "timeout"), {}
    log.error("internal error", exc_info=exc)
    return 500, body(f"internal error: {type(exc).__name__}", "internal_error"), {}


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
