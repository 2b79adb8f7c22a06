"""Latency of a pool of ``n`` workers under a demand, from a worker's timing profile.

For a demand of ``rate`` requests/s with mean input ``isl``, output ``osl`` and prefix-cache
hit ``hit`` (``Demand``), spread evenly over ``n`` workers:

- prefill work: ``rate * isl * (1 - hit)`` new prompt tokens/s (plus a backlog of waiting
  prompt tokens to work off within ``backlog_horizon_s``); a worker prefills at most
  ``chunk * 1000 / prefill_ms(chunk)`` tokens/s (``chunk`` = ``max_num_batched_tokens``), so
  its prefill utilisation is ``rho = work / (n * that)``;
- decode: by Little's law ``rate * osl * itl`` requests are decoding at once, each holding
  ``isl + osl / 2`` tokens on average; a worker's step takes ``itl_ms(batch, context)``
  from the profile; in an aggregated pool prefill chunks share the steps, so the ITL a
  request sees is that over ``1 - rho`` (solved as a fixed point, since the batch depends on
  the ITL);
- TTFT: the request's own prefill (``prefill_time_ms(isl, hit)`` plus, in an aggregated pool,
  one decode step per prefill chunk) plus an M/D/1 queue wait ``rho / (2 (1 - rho))`` times
  that service time;
- a pool whose decoding requests need more KV tokens than it holds, or with ``rho >= 1``,
  has infinite latency.

``replicas_needed`` is the smallest ``n`` in ``[1, max_n]`` whose predicted TTFT and ITL are
within ``headroom`` times the targets, else ``max_n``. Pure functions of their arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.core.timing_profile import TimingProfile

INF = math.inf


@dataclass(frozen=True)
class Demand:
    rate: float  # requests/s
    isl: float
    osl: float
    hit: float = 0.0  # prefix-cache hit share of prompt tokens
    backlog_prefill_tokens: float = 0.0
    backlog_horizon_s: float = 30.0

    @property
    def new_prompt_tokens_per_s(self) -> float:
        backlog = self.backlog_prefill_tokens / self.backlog_horizon_s
        return self.rate * self.isl * (1.0 - self.hit) + backlog


@dataclass(frozen=True)
class Latency:
    ttft_ms: float
    itl_ms: float
    rho: float  # prefill utilisation per worker
    batch: float  # decoding requests per worker

    def meets(self, ttft_ms: float, itl_ms: float, headroom: float) -> bool:
        return self.ttft_ms <= headroom * ttft_ms and self.itl_ms <= headroom * itl_ms


class PerfModel:
    def __init__(self, profile: TimingProfile, watermark: float = 0.01):
        self.profile = profile
        chunk = profile.max_num_batched_tokens
        self.prefill_tokens_per_s = chunk * 1000.0 / profile.prefill_time_ms(chunk)
        self.kv_tokens = profile.kv_capacity_tokens * (1.0 - watermark)

    def latency(self, n: int, demand: Demand, role: str = "both") -> Latency:
        """Predicted mean TTFT and ITL (ms) of pool ``role`` with ``n`` workers."""
        if n <= 0:
            return Latency(INF, INF, INF, INF)
        prof = self.profile
        rho = demand.new_prompt_tokens_per_s / (n * self.prefill_tokens_per_s)
        if role == "decode":
            rho = 0.0  # prompts are prefilled elsewhere
        if rho >= 1.0:
            return Latency(INF, INF, rho, INF)
        context = demand.isl + demand.osl / 2.0
        itl, batch = self._decode(n, demand, context, rho)
        if role == "prefill":
            itl, batch = 0.0, 0.0
        service = prof.prefill_time_ms(demand.isl, demand.hit)
        if role == "both" and batch > 0:
            chunks = math.ceil(demand.isl * (1.0 - demand.hit) / prof.max_num_batched_tokens)
            service += max(1, chunks) * prof.itl_ms(batch, context)
        ttft = INF if role == "decode" else service * (1.0 + rho / (2.0 * (1.0 - rho)))
        return Latency(0.0 if role == "decode" else ttft, itl, rho, batch)

    def _decode(self, n: int, d: Demand, context: float, rho: float) -> tuple[float, float]:
        """(ITL ms, decoding requests per worker) at the fixed point of Little's law."""
        if d.rate <= 0 or d.osl <= 1:
            return 0.0, 0.0
        itl = self.profile.itl_ms(1, context) / (1.0 - rho)
        batch = 0.0
        for _ in range(20):
            batch = d.rate * d.osl * itl / 1000.0 / n
            if batch > self.profile.max_num_seqs or batch * context > self.kv_tokens:
                return INF, batch
            new = self.profile.itl_ms(max(1.0, batch), context) / (1.0 - rho)
            if abs(new - itl) < 1e-3:
                break
            itl = new
        return itl, batch

    def replicas_needed(
        self,
        demand: Demand,
        ttft_ms: float,
        itl_ms: float,
        max_n: int,
        role: str = "both",
        headroom: float = 0.8,
    ) -> int:
        for n in range(1, max_n + 1):
            lat = self.latency(n, demand, role)
            ok_ttft = role == "decode" or lat.ttft_ms <= headroom * ttft_ms
            ok_itl = role == "prefill" or lat.itl_ms <= headroom * itl_ms
            if ok_ttft and ok_itl:
                return n
        return max_n

    # ---- Dynamo's interpolators over the same profile (the ``dynamo`` control) -----------
    def prefill_throughput_per_worker(self, isl: float) -> float:
        """Tokens/s of one worker prefilling ``isl``-token prompts one at a time."""
        return isl * 1000.0 / self.profile.prefill_time_ms(isl)

    def decode_throughput_per_worker(self, itl_ms: float, context: float) -> float:
        """The best output tokens/s of one worker whose ITL stays within ``itl_ms`` at
        ``context`` (Dynamo's ``find_best_throughput_per_gpu``): the largest measured batch
        that meets it, interpolated between measured batch sizes; the smallest batch's
        throughput when none does."""
        sizes = sorted({d.batch_size for d in self.profile.decode})
        best = 1000.0 / self.profile.itl_ms(sizes[0], context) * sizes[0]
        for lo, hi in zip(sizes, sizes[1:] + [sizes[-1]], strict=True):
            for b in _between(lo, hi):
                itl = self.profile.itl_ms(b, context)
                if itl <= itl_ms and b * context <= self.kv_tokens:
                    best = max(best, b * 1000.0 / itl)
        return best


def _between(lo: int, hi: int, steps: int = 8) -> list[float]:
    if hi <= lo:
        return [float(lo)]
    return [lo + (hi - lo) * i / steps for i in range(steps)]
