"""Errors that cross component boundaries. Each maps to one OpenAI error shape and HTTP status
in the frontend; messages name the file, parameter or limit at fault."""

from __future__ import annotations


class TokenmillError(Exception):
    """Base of tokenmill's own errors."""


class InvalidRequestError(TokenmillError, ValueError):
    """A request or parameter a client can fix (HTTP 400). ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceededError(InvalidRequestError):
    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class ModelLoadError(TokenmillError):
    """A model or tokenizer that cannot be loaded: missing path, unsupported architecture or
    tokenizer type, corrupt file, config/weights mismatch. The message names the file."""


class EngineDeadError(TokenmillError):
    """The engine loop died; the engine reports unhealthy and fails every caller."""


class OverloadedError(TokenmillError):
    """The router shed the request (HTTP 503 with Retry-After)."""

    def __init__(self, message: str = "server overloaded", retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestAbortedError(TokenmillError):
    """The request was aborted (client disconnect, deadline) before it finished."""
