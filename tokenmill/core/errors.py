"""Errors that cross component and process boundaries, and their registry.

Every error a client can be told about is a ``TokenmillError`` subclass that declares, as
class attributes, a stable wire ``code`` (unique; it names the class across processes), the
HTTP ``status``, OpenAI's error ``type``, the ``openai_code`` of the error JSON (often
shared: every 503 of a missing or failed worker says ``service_unavailable``), and whether
the request is ``retryable`` elsewhere (the frontend may migrate it or try another
instance). Instances carry a ``param`` (the request field at fault) and, for 503s, may carry
``retry_after_s``.

A class that declares its own ``code`` is registered when it is defined; ``from_wire`` looks
the code up and rebuilds the class with ``cls(message)`` (so every registered class takes
the message as its only required argument), then sets ``param`` and ``retry_after_s``.
An unknown code (a newer peer) becomes an ``InternalError`` keeping the message.
``client_error`` is the one gate both the wire and the HTTP mapping go through: a registered
error (or an unregistered subclass of one) stays itself; anything else, a plain Python
exception or an unregistered ``TokenmillError`` subclass, becomes an ``InternalError`` that
names only its class, so a server's internals never reach a client.

=========================  ========================  ======  =====================  =========
class                      code                      status  type                   retryable
=========================  ========================  ======  =====================  =========
InvalidRequestError        invalid_request           400     invalid_request_error  no
ContextLengthExceededError context_length_exceeded   400     invalid_request_error  no
DuplicateRequestError      duplicate_request_id      400     invalid_request_error  no
OverloadedError            overloaded                503     overloaded_error       yes
NoInstancesError           no_instances              503     service_unavailable    yes
InstanceFailedError        instance_failed           503     service_unavailable    yes
EngineDeadError            engine_dead               503     service_unavailable    yes
RequestAbortedError        request_aborted           503     service_unavailable    no
DeadlineExceededError      deadline_exceeded         504     timeout_error          no
RequestTimeoutError        request_timeout           408     invalid_request_error  no
ClientDisconnectedError    client_disconnected       499     invalid_request_error  no
EngineError                engine_error              500     internal_error         no
ModelLoadError             model_load_error          500     internal_error         no
KvTransferUnavailableError kv_transfer_unavailable   500     internal_error         no
KvLayoutMismatchError      kv_layout_mismatch        500     internal_error         no
InternalError              internal_error            500     internal_error         no
=========================  ========================  ======  =====================  =========

Messages name the file, parameter or limit at fault. ``EngineError`` and ``ModelLoadError``
messages may hold server internals (an exception's text, a file path): clients see only
``internal error: <class>`` (``expose_message = False``); the full message still crosses
the wire, for the frontend's log.
"""

from __future__ import annotations

from typing import ClassVar

_REGISTRY: dict[str, type[TokenmillError]] = {}


class TokenmillError(Exception):
    """Base of tokenmill's own errors. Its attributes are those of an internal error; a
    subclass that declares ``code`` registers itself under it (``TypeError`` if taken)."""

    code: ClassVar[str] = "internal_error"
    status: int = 500
    type: str = "internal_error"
    openai_code: str | None = None
    retryable: ClassVar[bool] = False
    expose_message: ClassVar[bool] = True
    param: str | None = None
    retry_after_s: float | None = None  # a 503's Retry-After; None: the server's default

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if code is None:
            return
        taken = _REGISTRY.get(code)
        if taken is not None:
            raise TypeError(f"error code {code!r} of {cls.__name__} is taken by {taken.__name__}")
        _REGISTRY[code] = cls

    def client_message(self) -> str:
        """The message a client is shown: the error's own, or only its class name when the
        message may hold server internals."""
        return str(self) if self.expose_message else f"internal error: {type(self).__name__}"


class InvalidRequestError(TokenmillError, ValueError):
    """A request or parameter a client can fix (HTTP 400). ``param`` names the field."""

    code = "invalid_request"
    status, type = 400, "invalid_request_error"
    openai_code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus ``max_tokens`` exceed the model's context."""

    code = "context_length_exceeded"
    openai_code = "context_length_exceeded"

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param=param)


class PromptTooLongError(ContextLengthExceededError):
    """A prompt rejected before it was tokenized whole: it has at least ``num_tokens_at_least``
    tokens, more than the ``max_num_tokens`` allowed (not registered: it travels as a
    ``ContextLengthExceededError``; the frontend rewords it with the context length)."""

    def __init__(self, num_tokens_at_least: int, max_num_tokens: int):
        super().__init__(
            f"the prompt has at least {num_tokens_at_least} tokens, more than the "
            f"{max_num_tokens} allowed"
        )
        self.num_tokens_at_least = num_tokens_at_least


class DuplicateRequestError(InvalidRequestError):
    """A request id that is already in flight on the instance (worker or request plane)."""

    code = "duplicate_request_id"
    openai_code = "duplicate_request_id"

    def __init__(self, message: str, param: str | None = "request_id"):
        super().__init__(message, param=param)

    @classmethod
    def for_request(cls, request_id: str) -> DuplicateRequestError:
        """The one message every layer uses, so the client's answer does not depend on
        which layer (worker, request plane) caught the duplicate."""
        return cls(f"request id {request_id!r} is already in flight")


class OverloadedError(TokenmillError):
    """The router shed the request (HTTP 503 with Retry-After: ``retry_after_s``)."""

    code = "overloaded"
    status, type, openai_code = 503, "overloaded_error", "overloaded"
    retryable = True

    def __init__(self, message: str = "server overloaded", retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _Unavailable(TokenmillError):
    """What the 503s of a missing or failed worker share (not registered itself)."""

    status, type, openai_code = 503, "service_unavailable", "service_unavailable"


class NoInstancesError(_Unavailable):
    """No live instance serves the endpoint (or the named instance is gone)."""

    code = "no_instances"
    retryable = True


class InstanceFailedError(_Unavailable):
    """The instance died mid-stream (networked: sequence gap, inactivity timeout, broken
    connection). The caller may migrate the request to another instance."""

    code = "instance_failed"
    retryable = True


class EngineDeadError(_Unavailable):
    """The engine loop died; the engine reports unhealthy and fails every caller."""

    code = "engine_dead"
    retryable = True


class RequestAbortedError(_Unavailable):
    """The request was aborted (client disconnect, deadline, no worker left to migrate to)
    before it finished."""

    code = "request_aborted"


class DeadlineExceededError(TokenmillError, TimeoutError):
    """A stream passed its deadline; the handler was stopped."""

    code = "deadline_exceeded"
    status, type, openai_code = 504, "timeout_error", "timeout"


class RequestTimeoutError(TokenmillError, TimeoutError):
    """The client did not send the request's headers or body within the server's read
    deadline (HTTP 408; the connection is closed after the answer)."""

    code = "request_timeout"
    status, type, openai_code = 408, "invalid_request_error", "request_timeout"


class ClientDisconnectedError(TokenmillError):
    """The client closed the connection before the request was read or answered (HTTP 499,
    nginx's "client closed request": nobody receives it; it is what logs and metrics say)."""

    code = "client_disconnected"
    status, type, openai_code = 499, "invalid_request_error", "client_disconnected"

    def __init__(self, message: str = "client disconnected"):
        super().__init__(message)


class EngineError(TokenmillError):
    """The engine failed the request (not the client's fault)."""

    code = "engine_error"
    expose_message = False


class ModelLoadError(TokenmillError):
    """A model or tokenizer that cannot be loaded: missing path, unsupported architecture or
    tokenizer type, corrupt file, config/weights mismatch. The message names the file."""

    code = "model_load_error"
    expose_message = False


class KvTransferUnavailableError(TokenmillError):
    """A prefill or decode role was asked for where the KV transfer library (NIXL) cannot
    load; the message says why and how to install it (aggregated serving still works)."""

    code = "kv_transfer_unavailable"


class KvLayoutMismatchError(TokenmillError):
    """A worker's KV layout (dtype, block size, layers, KV heads, head dim) differs from the
    layout of the prefill/decode pools it would join: blocks cannot move between them."""

    code = "kv_layout_mismatch"


class InternalError(TokenmillError):
    """A server fault with a client-safe message: an exception that is not a registered
    tokenmill error (``client_error``), or an error whose code this process does not know."""

    code = "internal_error"

    @classmethod
    def naming(cls, exc: BaseException) -> InternalError:
        return cls(f"internal error: {type(exc).__name__}")


def registered_errors() -> dict[str, type[TokenmillError]]:
    """code -> class, for every registered error (a copy)."""
    return dict(_REGISTRY)


def is_registered(exc: BaseException) -> bool:
    """Whether ``exc`` is an instance of the class registered under its code (its own class
    or a registered parent)."""
    cls = _REGISTRY.get(getattr(type(exc), "code", None) or "")
    return cls is not None and isinstance(exc, cls)


def client_error(exc: BaseException) -> TokenmillError:
    """``exc`` itself when registered; otherwise ``InternalError.naming(exc)``."""
    if isinstance(exc, TokenmillError) and is_registered(exc):
        return exc
    return InternalError.naming(exc)


def from_wire(
    code: str, message: str, param: str | None = None, retry_after_s: float | None = None
) -> TokenmillError:
    """Rebuilds the error a peer sent as ``(code, message, param, retry_after_s)``; an
    unknown code gives an ``InternalError`` with ``message``."""
    cls = _REGISTRY.get(code)
    if cls is None:
        return InternalError(message)
    exc = cls(message)  # the registry's contract: every registered class takes cls(message)
    exc.param = param
    if retry_after_s is not None:
        exc.retry_after_s = retry_after_s
    return exc
