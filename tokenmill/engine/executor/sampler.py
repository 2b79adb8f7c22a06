"""Batched sampling over the logits of the rows that sample this step.

Order of processing for one row (each stage only runs when some row of the batch needs it):
non-finite check (a row with NaN/+inf logits, or only -inf, fails alone) -> grammar mask
(constrained rows only: ``params.structured``; a row whose grammar allows nothing fails
alone) -> logit_bias -> repetition,
frequency and presence penalties -> min_tokens (EOS and stop ids masked) -> greedy argmax, or
temperature -> top_k -> top_p -> min_p -> a draw with the row's own generator.

Seeded rows draw from a ``torch.Generator`` owned by the request (created on first use,
dropped by ``release``), so a request's text depends only on its seed and its own logits,
never on what else is in the batch. Logprobs are those of the model's raw distribution
(``log_softmax`` of the unprocessed logits), with the top ``logprobs`` alternatives.

Constrained rows own a ``RequestGrammar`` (created on first use from ``grammars``, the
migrated tokens replayed; dropped by ``release``). Each step it catches up with the
request's output tokens, its mask is computed for all constrained rows at once (llguidance,
in parallel, on the CPU) and applied on the logits' device; the sampled token advances it,
and the tokens the grammar then forces are appended to the row's sample (jump-forward: the
scheduler computes them in the next step), except for rows that want logprobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenmill.core.request import TokenLogprob
from tokenmill.core.sampling import SamplingParams
from tokenmill.engine.executor.base import ExecutorOutput

if TYPE_CHECKING:
    from tokenmill.engine.structured.grammar import GrammarCompiler, RequestGrammar


@dataclass
class SamplingRow:
    """One row of the logits: the request it belongs to and the tokens that condition it."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


class Sampler:
    """Stateful only in its per-request generators and grammars; ``eos_token_ids`` are
    masked by min_tokens. ``grammars`` None: a constrained row fails (no grammar support)."""

    def __init__(
        self,
        eos_token_ids: Sequence[int],
        device: torch.device | str = "cpu",
        grammars: GrammarCompiler | None = None,
    ):
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(device)
        self.grammars = grammars
        self.jump_forward = True  # append the tokens a grammar forces (False: one per step)
        self._generators: dict[str, torch.Generator] = {}
        self._request_grammars: dict[str, RequestGrammar] = {}
        self._shared = torch.Generator(self.device)
        self._shared.seed()

    def release(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)
            self._request_grammars.pop(rid, None)

    @property
    def num_grammars(self) -> int:
        """Constrained requests holding a grammar now (0 once all were released)."""
        return len(self._request_grammars)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> ExecutorOutput:
        """``logits``: [N, V] float32, row i belongs to ``rows[i]``."""
        out = ExecutorOutput()
        # -inf entries are legal (masked tokens); NaN, +inf or an all -inf row are not. One
        # reduction serves the check and the greedy choice (max propagates NaN, and like
        # argmax returns the first maximal index), and one host transfer brings both back.
        best, best_ids = logits.max(dim=-1)  # [N] each
        finite, argmax = torch.stack((torch.isfinite(best).long(), best_ids)).tolist()
        keep = [i for i, ok in enumerate(finite) if ok]
        for i, ok in enumerate(finite):
            if not ok:
                out.errors[rows[i].request_id] = "non-finite logits (NaN, +inf or all -inf)"
        if not keep:
            return out
        if len(keep) < len(rows):
            logits = logits[keep]  # [N', V]
            rows = [rows[i] for i in keep]
            argmax = [argmax[i] for i in keep]
        raw = logits  # unprocessed: the logprobs are of these
        known_argmax: list[int] | None = argmax
        if any(r.params.structured is not None for r in rows):
            logits, kept = self._mask_grammars(logits, rows, out)  # [N'', V]
            if not kept:
                return out
            if len(kept) < len(rows):
                raw, rows = raw[kept], [rows[i] for i in kept]
            known_argmax = None  # the mask moved it
        processed = self._process(logits, rows)  # [N'', V]
        tokens = self._choose(processed, rows, known_argmax if processed is logits else None)
        for row, tok in zip(rows, tokens, strict=True):
            out.sampled[row.request_id] = [tok]
        self._advance_grammars(out, rows, tokens)
        self._add_logprobs(out, raw, rows, tokens)
        return out

    # -- grammars ---------------------------------------------------------------------------

    def _mask_grammars(
        self, logits: torch.Tensor, rows: list[SamplingRow], out: ExecutorOutput
    ) -> tuple[torch.Tensor, list[int]]:
        """(``logits`` of the rows kept, each constrained one masked to what its grammar
        allows (a copy) [K, V], the kept rows' indices). A row whose grammar fails or allows
        nothing goes to ``out.errors`` and is dropped."""
        from tokenmill.engine.structured.grammar import fill_masks

        idx = [i for i, r in enumerate(rows) if r.params.structured is not None]
        grammars, ok = [], []
        for i in idx:
            grammar = self._grammar(rows[i], out)
            if grammar is not None:
                grammars.append(grammar)
                ok.append(i)
        failed = set(idx) - set(ok)
        if ok:
            assert self.grammars is not None
            words = np.empty((len(ok), self.grammars.mask_words), dtype=np.int32)  # [G, W]
            fill_masks(self.grammars, grammars, words)
            allowed = _unpack_mask(torch.from_numpy(words), logits.shape[1], logits.device)
            logits = logits.clone()  # [N, V]
            logits[ok] = logits[ok].masked_fill_(~allowed, float("-inf"))  # [G, V]
            for j in (~allowed.any(dim=-1)).nonzero().flatten().tolist():
                out.errors[rows[ok[j]].request_id] = "the grammar allows no token here"
                failed.add(ok[j])
        kept = [i for i in range(len(rows)) if i not in failed]
        return (logits if not failed else logits[kept]), kept

    def _grammar(self, row: SamplingRow, out: ExecutorOutput) -> RequestGrammar | None:
        """The row's grammar caught up with its output tokens; None (the reason in
        ``out.errors``) when it cannot be had or refused a token."""
        grammar = self._request_grammars.get(row.request_id)
        if grammar is None:
            try:
                grammar = self._new_grammar(row)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                out.errors[row.request_id] = f"grammar: {e}"
                return None
            self._request_grammars[row.request_id] = grammar
        grammar.sync(row.output_token_ids)
        if grammar.error is not None:
            out.errors[row.request_id] = grammar.error
            return None
        return grammar

    def _new_grammar(self, row: SamplingRow) -> RequestGrammar:
        from tokenmill.engine.structured.grammar import RequestGrammar

        spec = row.params.structured
        assert spec is not None
        if self.grammars is None:
            raise ValueError("this engine has no grammar support (structured output)")
        resumed = spec.num_resumed_tokens
        replayed = list(row.prompt_token_ids[len(row.prompt_token_ids) - resumed :])
        return RequestGrammar(self.grammars.matcher(spec), replayed if resumed else ())

    def _advance_grammars(
        self, out: ExecutorOutput, rows: list[SamplingRow], tokens: list[int]
    ) -> None:
        """The sampled tokens advance their grammars; forced tokens follow (jump-forward)."""
        for row, tok in zip(rows, tokens, strict=True):
            grammar = self._request_grammars.get(row.request_id)
            if grammar is None or row.params.structured is None:
                continue
            grammar.consume([tok])
            if self.jump_forward and row.params.logprobs is None and tok not in self.eos_token_ids:
                out.sampled[row.request_id].extend(grammar.jump_forward())

    # -- logits processors ------------------------------------------------------------------

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        needs = [_needs_processing(r.params, len(r.output_token_ids)) for r in rows]
        if not any(needs):
            return logits
        logits = logits.clone()  # [N, V]
        for i, row in enumerate(rows):
            if needs[i]:
                self._process_row(logits[i], row)
        return logits

    def _process_row(self, row_logits: torch.Tensor, row: SamplingRow) -> None:
        """In place on one row, ``row_logits``: [V]."""
        p = row.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), device=row_logits.device)
            vals = torch.tensor(list(p.logit_bias.values()), device=row_logits.device)
            row_logits.index_add_(0, ids, vals.to(row_logits.dtype))
        if p.repetition_penalty != 1.0:
            _repetition_penalty(row_logits, row, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            out_ids = torch.tensor(list(row.output_token_ids), device=row_logits.device)
            counts = torch.bincount(out_ids, minlength=row_logits.shape[0])  # [V]
            counts = counts.to(row_logits.dtype)
            row_logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if len(row.output_token_ids) < p.min_tokens:
            banned = list(self.eos_token_ids) + list(p.stop_token_ids)
            banned = [t for t in banned if t < row_logits.shape[0]]
            row_logits[banned] = float("-inf")

    # -- choosing a token -------------------------------------------------------------------

    def _choose(
        self, logits: torch.Tensor, rows: list[SamplingRow], argmax: list[int] | None
    ) -> list[int]:
        """``argmax``: the rows' argmax when already known (unprocessed logits)."""
        greedy = logits.argmax(dim=-1).tolist() if argmax is None else list(argmax)  # [N]
        random_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not random_idx:
            return greedy
        sub = logits[random_idx]  # [R, V]
        params = [rows[i].params for i in random_idx]
        probs = _filtered_probs(sub, params)  # [R, V]
        noise = self._noise(probs, [rows[i].request_id for i in random_idx], params)  # [R, V]
        drawn = (probs / noise).argmax(dim=-1).tolist()  # exponential race == multinomial
        for i, tok in zip(random_idx, drawn, strict=True):
            greedy[i] = tok
        return greedy

    def _noise(self, probs: torch.Tensor, ids: list[str], params: list[SamplingParams]):
        """Exp(1) noise [R, V]; seeded rows draw from their own generator, one row at a time."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            shared = torch.empty((len(unseeded), probs.shape[1]), device=probs.device)
            noise[unseeded] = shared.exponential_(generator=self._shared)
        for i, p in enumerate(params):
            if p.seed is not None:
                noise[i].exponential_(generator=self._generator(ids[i], p.seed))
        return noise.clamp_min_(1e-20)

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(self.device)
            gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    # -- logprobs ---------------------------------------------------------------------------

    def _add_logprobs(self, out: ExecutorOutput, raw: torch.Tensor, rows, tokens) -> None:
        idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not idx:
            return
        logp = torch.log_softmax(raw[idx].float(), dim=-1)  # [L, V]
        for j, i in enumerate(idx):
            n = rows[i].params.logprobs
            top_v, top_i = logp[j].topk(n) if n else (logp[j][:0], logp[j][:0].long())
            top = list(zip(top_i.tolist(), top_v.tolist(), strict=True))
            lp = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), top)
            out.logprobs[rows[i].request_id] = [lp]


def _unpack_mask(words: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """Bit masks ``words`` [G, W] int32 (bit ``b`` of word ``w`` is id ``32 w + b``) as bool
    [G, vocab] on ``device``; ids past ``32 W`` are never allowed."""
    words = words.to(device, non_blocking=True)
    bits = torch.arange(32, device=device, dtype=torch.int32)  # [32]
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)  # [G, 32 W]
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    pad = allowed.new_zeros((allowed.shape[0], vocab - allowed.shape[1]))  # [G, V - 32 W]
    return torch.cat((allowed, pad), dim=1)  # [G, V]


def _needs_processing(p: SamplingParams, num_output_tokens: int) -> bool:
    return bool(
        p.logit_bias
        or p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
        or num_output_tokens < p.min_tokens
    )


def _repetition_penalty(row_logits: torch.Tensor, row: SamplingRow, penalty: float) -> None:
    """CTRL-style: seen tokens (prompt or output) have positive logits divided, negative
    multiplied by ``penalty``."""
    seen = list(row.prompt_token_ids) + list(row.output_token_ids)
    if not seen:
        return
    ids = torch.tensor(seen, device=row_logits.device).unique()  # [S]
    vals = row_logits[ids]
    row_logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top_k / top_p / min_p filters; returns probabilities [R, V]."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits / temps.unsqueeze(1)  # [R, V]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    probs = torch.softmax(logits, dim=-1)  # [R, V]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values  # [R, 1]
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    sorted_logits = sorted_logits.masked_fill(rank >= ks.unsqueeze(1), float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    probs = torch.softmax(sorted_logits, dim=-1)  # [R, V]
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each rank
    sorted_logits = sorted_logits.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
