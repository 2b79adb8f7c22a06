"""The error registry: every code's class, status, OpenAI type and code and retryability
pinned; rebuilding from the wire; what a client is told about an unregistered exception;
the OpenAI error JSON and headers ``classify`` gives each error."""

from __future__ import annotations

import pytest

from tokenmill.core import errors
from tokenmill.core.errors import (
    ContextLengthExceededError,
    DuplicateRequestError,
    InternalError,
    InvalidRequestError,
    OverloadedError,
    TokenmillError,
    client_error,
    from_wire,
    is_registered,
    registered_errors,
)
from tokenmill.frontend.errors import HttpError, classify

# code: (class name, status, type, code in the error JSON, retryable)
REGISTRY = {
    "invalid_request": ("InvalidRequestError", 400, "invalid_request_error", None, False),
    "context_length_exceeded": (
        "ContextLengthExceededError",
        400,
        "invalid_request_error",
        "context_length_exceeded",
        False,
    ),
    "duplicate_request_id": (
        "DuplicateRequestError",
        400,
        "invalid_request_error",
        "duplicate_request_id",
        False,
    ),
    "overloaded": ("OverloadedError", 503, "overloaded_error", "overloaded", True),
    "no_instances": ("NoInstancesError", 503, "service_unavailable", "service_unavailable", True),
    "instance_failed": (
        "InstanceFailedError",
        503,
        "service_unavailable",
        "service_unavailable",
        True,
    ),
    "engine_dead": ("EngineDeadError", 503, "service_unavailable", "service_unavailable", True),
    "request_aborted": (
        "RequestAbortedError",
        503,
        "service_unavailable",
        "service_unavailable",
        False,
    ),
    "deadline_exceeded": ("DeadlineExceededError", 504, "timeout_error", "timeout", False),
    "request_timeout": (
        "RequestTimeoutError",
        408,
        "invalid_request_error",
        "request_timeout",
        False,
    ),
    "client_disconnected": (
        "ClientDisconnectedError",
        499,
        "invalid_request_error",
        "client_disconnected",
        False,
    ),
    "engine_error": ("EngineError", 500, "internal_error", None, False),
    "model_load_error": ("ModelLoadError", 500, "internal_error", None, False),
    "kv_transfer_unavailable": ("KvTransferUnavailableError", 500, "internal_error", None, False),
    "kv_layout_mismatch": ("KvLayoutMismatchError", 500, "internal_error", None, False),
    "internal_error": ("InternalError", 500, "internal_error", None, False),
}


def test_registry_pins_every_code():
    got = {
        code: (cls.__name__, cls.status, cls.type, cls.openai_code, cls.retryable)
        for code, cls in registered_errors().items()
    }
    assert got == REGISTRY
    assert all(cls.code == code for code, cls in registered_errors().items())


def test_runtime_and_worker_errors_are_the_registered_classes():
    from tokenmill.frontend.serving import EngineError
    from tokenmill.runtime import interface
    from tokenmill.worker.worker import DuplicateRequestError as WorkerDuplicate

    assert interface.NoInstancesError is errors.NoInstancesError
    assert interface.InstanceFailedError is errors.InstanceFailedError
    assert interface.DeadlineExceededError is errors.DeadlineExceededError
    assert WorkerDuplicate is DuplicateRequestError and EngineError is errors.EngineError


def test_a_taken_code_is_refused_at_class_definition():
    with pytest.raises(TypeError, match="'overloaded' of Mine is taken by OverloadedError"):
        type("Mine", (TokenmillError,), {"code": "overloaded"})
    assert registered_errors()["overloaded"] is OverloadedError


def test_from_wire_rebuilds_the_class_with_param_and_retry_after():
    exc = from_wire("context_length_exceeded", "too long", "prompt")
    assert type(exc) is ContextLengthExceededError
    assert (str(exc), exc.param) == ("too long", "prompt")
    shed = from_wire("overloaded", "shed", None, 4.0)
    assert type(shed) is OverloadedError and shed.retry_after_s == 4.0
    assert from_wire("overloaded", "shed").retry_after_s == 1.0  # the class's default
    assert from_wire("invalid_request", "bad", None).param is None


def test_from_wire_with_an_unknown_code_keeps_the_message_as_internal():
    exc = from_wire("from_a_newer_peer", "it went wrong", "x")
    assert type(exc) is InternalError and str(exc) == "it went wrong" and exc.param is None


def test_client_error_names_only_the_class_of_what_is_not_registered():
    class LocalError(TokenmillError):  # declares no code: not registered
        pass

    for exc, name in ((KeyError("secret"), "KeyError"), (LocalError("secret"), "LocalError")):
        err = client_error(exc)
        assert type(err) is InternalError and str(err) == f"internal error: {name}"
    own = InvalidRequestError("bad n", "n")
    assert client_error(own) is own


def test_an_unregistered_subclass_counts_as_its_registered_parent():
    class PromptError(InvalidRequestError):
        pass

    exc = PromptError("the prompt is empty", "prompt")
    assert is_registered(exc) and client_error(exc) is exc
    assert not is_registered(HttpError(404, "no such model"))


def _json(message, type, param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@pytest.mark.parametrize(
    ("exc", "status", "body", "headers"),
    [
        (
            InvalidRequestError("n must be in [1, 128]", "n"),
            400,
            _json("n must be in [1, 128]", "invalid_request_error", "n"),
            {},
        ),
        (
            ContextLengthExceededError("too long"),
            400,
            _json("too long", "invalid_request_error", "messages", "context_length_exceeded"),
            {},
        ),
        (
            DuplicateRequestError.for_request("r-0"),
            400,
            _json(
                "request id 'r-0' is already in flight",
                "invalid_request_error",
                "request_id",
                "duplicate_request_id",
            ),
            {},
        ),
        (
            OverloadedError("shed", retry_after_s=2.6),
            503,
            _json("shed", "overloaded_error", None, "overloaded"),
            {"Retry-After": "3"},
        ),
        (
            errors.NoInstancesError("no worker is serving"),
            503,
            _json("no worker is serving", "service_unavailable", None, "service_unavailable"),
            {"Retry-After": "5"},
        ),
        (
            errors.RequestAbortedError("aborted"),
            503,
            _json("aborted", "service_unavailable", None, "service_unavailable"),
            {"Retry-After": "5"},
        ),
        (
            errors.DeadlineExceededError("late"),
            504,
            _json("late", "timeout_error", None, "timeout"),
            {},
        ),
        (
            errors.EngineError("RuntimeError: CUDA at /srv/x.py"),
            500,
            _json("internal error: EngineError", "internal_error"),
            {},
        ),
        (KeyError("secret"), 500, _json("internal error: KeyError", "internal_error"), {}),
        (
            HttpError(404, "the model 'x' does not exist", param="model", code="model_not_found"),
            404,
            _json(
                "the model 'x' does not exist", "invalid_request_error", "model", "model_not_found"
            ),
            {},
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_classify_maps_each_error_to_its_status_json_and_headers(exc, status, body, headers):
    assert classify(exc, retry_after_s=5.0) == (status, body, headers)
