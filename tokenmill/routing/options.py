"""Per-request router options: the extra field ``router`` of OpenAI request bodies, and part of
the standalone router's wire request (``remote_router.RouteRequest``)."""

from __future__ import annotations

import msgspec


class RouterOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Per-request router knobs (extra field ``router``): the cost policy's knobs, and
    ``worker_id`` (an instance id) to pin the request, allowed only with ``--allow-pinning``."""

    temperature: float | None = None
    prefill_load_scale: float | None = None
    decode_weight: float | None = None
    lower_tier_credit: float | None = None  # overlap credit for blocks in lower tiers
    worker_id: str | None = None

    def knobs(self) -> dict[str, float]:
        names = ("temperature", "prefill_load_scale", "decode_weight", "lower_tier_credit")
        return {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}
