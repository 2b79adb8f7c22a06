"""Wire structs of KV events and router state on the event plane (see ``worker/kv_publisher``
and ``routing/kv_events``, ``routing/replicas``).

- topic ``kv``: ``KvEventBatch``, a worker instance's live KV events (consecutive ids within
  an ``epoch``; a new epoch means the worker restarted its numbering);
- endpoint ``kv_replay`` of each worker instance: ``KvReplayRequest`` in, ``KvReplayChunk``s
  out (the missed events, or a full dump in chunks that fit NATS's payload limit);
- topic ``route``: ``RouteEvent``, one router replica's in-flight changes (request added to a
  worker, prefill done, freed), so replicas account for each other's load.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from tokenmill.core.events import KvEvent
from tokenmill.runtime.wire import WIRE_VERSION

KV_TOPIC = "kv"
KV_REPLAY_ENDPOINT = "kv_replay"
ROUTE_TOPIC = "route"


def replay_instance_id(instance_id: str) -> str:
    """The ``kv_replay`` instance of the worker whose ``generate`` instance is ``instance_id``
    (a distinct id: a runtime dispatches requests by instance id)."""
    return f"{instance_id}-kv"


class KvEventBatch(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    epoch: str
    events: list[KvEvent]
    version: int = WIRE_VERSION


class KvReplayRequest(msgspec.Struct, frozen=True, kw_only=True):
    from_event_id: int | None = None  # None: a full dump
    version: int = WIRE_VERSION


class KvReplayChunk(msgspec.Struct, frozen=True, kw_only=True):
    """``reset``: forget what is known of this worker first (a dump's first chunk). Every
    chunk carries the ``next_event_id`` its contents are consistent with."""

    epoch: str
    next_event_id: int
    events: list[KvEvent]
    reset: bool = False
    version: int = WIRE_VERSION


class RouteEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One in-flight change of a router replica; ``hello`` announces the replica itself
    (a heartbeat, and the answer to a replica heard for the first time)."""

    kind: Literal["added", "prefill_done", "freed", "hello"]
    replica_id: str
    request_id: str
    instance_id: str = ""
    block_hashes: list[int] = []
    num_prompt_tokens: int = 0
    num_prefill_tokens: int = 0
    version: int = WIRE_VERSION


# endpoint ``kv_release`` of each prefill-capable worker: ``KvReleaseRequest`` in, one
# ``KvReleaseReply`` out: free the blocks held for these requests' KV transfers at once (their
# decode worker rejected or failed them, or the client left)
KV_RELEASE_ENDPOINT = "kv_release"


def release_instance_id(instance_id: str) -> str:
    """The ``kv_release`` instance of the worker whose ``generate`` instance is ``instance_id``."""
    return f"{instance_id}-kv-release"


class KvReleaseRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_ids: list[str]
    version: int = WIRE_VERSION


class KvReleaseReply(msgspec.Struct, frozen=True, kw_only=True):
    num_requests: int
    version: int = WIRE_VERSION
