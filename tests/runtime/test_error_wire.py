"""Errors on the wire, as plain data: every registered error survives ``error_to_chunk`` ->
msgpack -> ``error_from_chunk`` as the same class with the same message, param, code and
Retry-After, and ``classify`` answers the rebuilt error exactly as the original; a
non-tokenmill exception crosses as the internal error ``classify`` makes of it in-process."""

from __future__ import annotations

import msgspec
import pytest
from error_samples import all_samples, registered_samples

from tokenmill.core.errors import InternalError, registered_errors
from tokenmill.frontend.errors import classify
from tokenmill.runtime.remote_stream import error_from_chunk, error_to_chunk
from tokenmill.runtime.wire import StreamChunk

_ENC, _DEC = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(StreamChunk)


def over_the_wire(exc: BaseException) -> Exception:
    chunk = _DEC.decode(_ENC.encode(error_to_chunk("r-0", 3, exc)))
    assert (chunk.request_id, chunk.seq, chunk.final, chunk.payload) == ("r-0", 3, True, b"")
    return error_from_chunk(chunk)


def test_the_samples_cover_every_registered_error():
    assert registered_samples().keys() == registered_errors().keys()


@pytest.mark.parametrize("code", list(registered_samples()))
def test_a_registered_error_round_trips_as_itself(code):
    exc = registered_samples()[code]
    back = over_the_wire(exc)
    assert type(back) is type(exc) and back.code == code
    assert (str(back), back.param, back.retry_after_s) == (str(exc), exc.param, exc.retry_after_s)
    assert classify(back) == classify(exc)


def test_the_chunk_carries_code_message_param_and_retry_after():
    chunk = error_to_chunk("r", 0, registered_samples()["overloaded"])
    assert (chunk.error_code, chunk.error, chunk.error_param, chunk.error_retry_after_s) == (
        "overloaded",
        "request shed: queue full",
        None,
        7.0,
    )
    dup = error_to_chunk("r", 0, registered_samples()["duplicate_request_id"])
    assert (dup.error_code, dup.error_param) == ("duplicate_request_id", "request_id")


def test_a_plain_exception_crosses_as_the_internal_error_classify_makes_of_it():
    exc = all_samples()["KeyError"]
    back = over_the_wire(exc)
    assert type(back) is InternalError and str(back) == "internal error: KeyError"
    assert classify(back) == classify(exc)


def test_a_chunk_without_a_code_is_an_internal_error_keeping_the_message():
    old_peer = StreamChunk(request_id="r", seq=0, final=True, error="boom")
    back = error_from_chunk(old_peer)
    assert type(back) is InternalError and str(back) == "boom"
