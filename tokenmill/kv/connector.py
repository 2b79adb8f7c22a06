"""The scheduler side of a KV connector (pure: no I/O, no clock): whether a finished
request's blocks may be freed now or must be held for a transfer.

A later connector (disaggregation: a decode worker READs the blocks of a prefill worker's
finished request; tiers: an offload to host, disk or a remote store is in flight) answers
``request_finished`` with True; the engine then calls ``Scheduler.release_held_blocks`` when
the worker side reports the transfer done, aborted or timed out. ``NULL_CONNECTOR`` holds
nothing: the scheduler then behaves exactly as without a connector.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.kv.manager import KVRequest


class SchedulerConnector:
    """Base and null object: never holds blocks. Subclasses override ``request_finished``."""

    def request_finished(self, request: KVRequest, block_ids: Sequence[int]) -> bool:
        """Called once per finished, aborted or errored request that holds blocks (never on
        preemption), before they are freed. True: keep the blocks referenced until
        ``Scheduler.release_held_blocks([request.request_id])``; the connector owns that
        promise and must ask for the release on completion, abort or timeout. Must not keep
        ``block_ids`` beyond the call without copying it."""
        return False


NULL_CONNECTOR = SchedulerConnector()
