"""Wire structs of the runtime: what crosses a process boundary between a client and an
endpoint instance. The in-process transport passes payload objects through untouched; a
networked transport (NATS, TCP) frames these structs with msgspec.

Every struct carries ``version``; a receiver that sees a higher major version than
``WIRE_VERSION`` rejects the message instead of guessing. Stream chunks carry a sequence
number starting at 0 per request, so a networked client can detect a gap or a duplicate
(either counts as an instance failure).
"""

from __future__ import annotations

import msgspec

WIRE_VERSION = 1
LOAD_TOPIC = "load"  # event-plane topic of ``WorkerLoad`` messages


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One served instance of an endpoint, as discovery lists it.

    ``address`` is transport-specific (empty in-process; ``tcp://host:port`` or a NATS subject
    for networked transports). ``metadata`` is free-form (model card, worker role).
    """

    namespace: str
    component: str
    endpoint: str
    instance_id: str
    address: str = ""
    metadata: dict[str, str] = {}
    version: int = WIRE_VERSION


class RequestEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """A request on the request plane. ``deadline_unix_s`` is wall-clock (it crosses hosts);
    None means no deadline. ``payload`` is the msgspec-encoded request struct."""

    request_id: str
    instance_id: str
    payload: bytes
    deadline_unix_s: float | None = None
    version: int = WIRE_VERSION


class StreamChunk(msgspec.Struct, frozen=True, kw_only=True):
    """One response item. ``seq`` counts 0, 1, 2... per request. The last chunk has
    ``final=True``; when the handler raised, it carries no payload but the error: its
    message in ``error``, its registered code (``core.errors``) in ``error_code``, the
    request field at fault in ``error_param`` and, for a 503 that names one, its
    Retry-After in ``error_retry_after_s``. A receiver rebuilds the error with
    ``core.errors.from_wire``; a code it does not know gives an internal error."""

    request_id: str
    seq: int
    payload: bytes = b""
    final: bool = False
    error: str | None = None
    error_code: str | None = None
    error_param: str | None = None
    error_retry_after_s: float | None = None
    version: int = WIRE_VERSION


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Sent by a client that closed its stream: the instance must stop the handler."""

    request_id: str
    version: int = WIRE_VERSION


class WorkerLoad(msgspec.Struct, frozen=True, kw_only=True):
    """Load figures a worker publishes on the event plane (topic ``load``). Fields added
    later have defaults, so a message from an older worker still decodes (as 0)."""

    instance_id: str
    num_running_requests: int = 0
    num_waiting_requests: int = 0  # the queue depth: waiting and preempted requests
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_hit_rate: float = 0.0  # cached prompt tokens / prompt tokens, 0..1
    num_total_blocks: int = 0
    version: int = WIRE_VERSION
    step_time_ms: float = 0.0  # recent wall time of one engine step (EWMA); 0: none yet
    num_waiting_prefill_tokens: int = 0  # tokens the waiting requests must compute first
    num_preemptions: int = 0  # requests preempted since the engine started (cumulative)
    num_held_kv_blocks: int = 0  # blocks finished requests hold for a KV transfer (prefill)
    num_kv_load_failures: int = 0  # KV loads that failed and were recomputed (cumulative)


def check_version(version: int) -> None:
    """Raises ValueError for a message from a newer, incompatible wire version."""
    if version > WIRE_VERSION:
        raise ValueError(f"wire version {version} is newer than supported {WIRE_VERSION}")
