"""Latency of a pool of ``n`` workers under a demand, from a worker's timing profile.

For a demand of ``rate`` requests/s with mean input ``isl``, output ``osl`` and prefix-cache
hit ``hit`` (``Demand``; plus a backlog of waiting prompt tokens to work off within
``backlog_horizon_s``), spread evenly over ``n`` workers, the mean step time ``T`` of a
worker is the fixed point of

    T = itl_ms(batch, isl + osl / 2) + P * prefill_time_ms(new prompt tokens per ms * T / P)
    P = 1 - exp(-requests per ms * T)       batch = requests per ms * osl * T   (Little)

(a continuously batching worker pays the decode step of its running batch every step, and a
prefill of what arrived since the last one in the steps that found a new request; the mocker
prices a step exactly so, and the profile measures both terms). The ITL a request sees is
``T``; its TTFT ``1.5 T`` (the rest of the current step, then its own) plus a full chunk per
extra chunk of a long prompt. A prefill pool has no decode term, a decode pool no prefill
term. Latency is infinite when prompts arrive faster than full chunks clear them, or the
decoding requests outgrow ``max_num_seqs`` or the KV pool.

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
        self.kv_tokens = profile.kv_capacity_tokens * (1.0 - watermark)

    def latency(self, n: int, demand: Demand, role: str = "both") -> Latency:
        """Predicted mean TTFT and ITL (ms) of pool ``role`` with ``n`` workers."""
        if n <= 0:
            return Latency(INF, INF, INF, INF)
        prof, chunk = self.profile, self.profile.max_num_batched_tokens
        rate = demand.rate / n / 1000.0  # requests per ms per worker
        tokens = demand.new_prompt_tokens_per_s / n / 1000.0  # new prompt tokens per ms
        context = demand.isl + demand.osl / 2.0
        if role == "decode":
            rate = tokens = 0.0  # prompts are prefilled elsewhere
        step, batch = self._step(rate, tokens, demand, context, role)
        if math.isinf(step):
            return Latency(INF, INF, 1.0, batch)
        rho = min(1.0, tokens * prof.prefill_time_ms(chunk) / chunk)
        extra = max(0, math.ceil(demand.isl * (1.0 - demand.hit) / chunk) - 1)
        ttft = 1.5 * step + extra * prof.prefill_time_ms(chunk)
        return Latency(
            0.0 if role == "decode" else ttft, 0.0 if role == "prefill" else step, rho, batch
        )

    def _step(
        self, rate: float, tokens: float, d: Demand, context: float, role: str
    ) -> tuple[float, float]:
        """(mean step ms, decoding requests per worker) at the fixed point of: a step takes
        the decode time of its batch plus, when a request arrived during the previous step
        (probability ``1 - exp(-rate * T)``), the prefill of the tokens that arrived since
        the last prefill; the batch is Little's law ``rate * osl * T``."""
        prof, chunk = self.profile, self.profile.max_num_batched_tokens
        decodes = role != "prefill" and d.osl > 1
        step, batch = 1.0, 0.0
        for _ in range(100):
            batch = rate * d.osl * step if decodes else 0.0
            if batch > prof.max_num_seqs or batch * context > self.kv_tokens:
                return INF, batch
            p = 1.0 - math.exp(-rate * step) if tokens > 0 else 0.0
            per_prefill = tokens * step / p if p > 0 else 0.0
            if per_prefill > chunk:
                return INF, batch  # prompts arrive faster than full chunks clear them
            new = prof.itl_ms(max(1.0, batch), context) if decodes else 0.0
            new += p * prof.prefill_time_ms(per_prefill) if p > 0 else 0.0
            if abs(new - step) < 1e-4:
                return new, batch
            step = new
        return step, batch

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

    def prefill_backlog_ms(self, num_tokens: float) -> float:
        """Time to prefill ``num_tokens`` on one worker: one step up to a chunk, else full
        chunks (the profile ends at one request's prefill; a backlog is many of them)."""
        chunk = self.profile.max_num_batched_tokens
        if num_tokens <= chunk:
            return self.profile.prefill_time_ms(num_tokens)
        return num_tokens / chunk * self.profile.prefill_time_ms(chunk)

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
