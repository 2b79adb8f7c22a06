"""One instance of every registered error (with a param or Retry-After where the class has
one), plus a plain Python exception, as the error tests raise them."""

from __future__ import annotations

from tokenmill.core.errors import (
    ClientDisconnectedError,
    ContextLengthExceededError,
    DeadlineExceededError,
    DuplicateRequestError,
    EngineDeadError,
    EngineError,
    InstanceFailedError,
    InternalError,
    InvalidRequestError,
    KvLayoutMismatchError,
    KvTransferUnavailableError,
    ModelLoadError,
    NoInstancesError,
    OverloadedError,
    RequestAbortedError,
    RequestTimeoutError,
)


def registered_samples() -> dict[str, Exception]:
    """code -> a fresh instance of the class registered under it."""
    return {
        "invalid_request": InvalidRequestError("n must be in [1, 128]", param="n"),
        "context_length_exceeded": ContextLengthExceededError(
            "prompt (9000 tokens) + max_tokens (16) exceed the context (8192)", param="prompt"
        ),
        "duplicate_request_id": DuplicateRequestError.for_request("cmpl-1-0"),
        "overloaded": OverloadedError("request shed: queue full", retry_after_s=7.0),
        "no_instances": NoInstancesError("no worker is serving"),
        "instance_failed": InstanceFailedError("connection to tcp://10.0.0.2:4000 lost"),
        "engine_dead": EngineDeadError("the engine of this worker is not healthy"),
        "request_aborted": RequestAbortedError("request r was aborted by the worker"),
        "deadline_exceeded": DeadlineExceededError("request r passed its deadline"),
        "request_timeout": RequestTimeoutError("the request body did not arrive within 60 s"),
        "client_disconnected": ClientDisconnectedError("client closed the connection mid-body"),
        "engine_error": EngineError("request r failed in the engine: RuntimeError: CUDA"),
        "model_load_error": ModelLoadError("/models/x/config.json: unsupported architecture"),
        "kv_transfer_unavailable": KvTransferUnavailableError(
            "--role prefill needs NIXL: pip install --no-deps nixl nixl-cu12"
        ),
        "kv_layout_mismatch": KvLayoutMismatchError(
            "KV layout bfloat16/16 differs from the decode pool's float32/16"
        ),
        "internal_error": InternalError("internal error: ZeroDivisionError"),
    }


def all_samples() -> dict[str, Exception]:
    """The registered samples and ``"KeyError"``: a handler's bug, no tokenmill error."""
    return {**registered_samples(), "KeyError": KeyError("secret-key-name")}
