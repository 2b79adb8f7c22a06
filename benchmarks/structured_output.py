"""Constrained decoding (issue 20): its throughput cost at 32 concurrent requests, and the
validity of what it generates.

Runs the offline engine (``LLM``, the default model SmolLM2-135M-Instruct unless ``--model``)
with 32 requests at once, each asked (chat template) for a JSON object of one of 10 schemas:

- **throughput**: rounds of ``constrained_no_jf`` (the schema as ``StructuredOutput``,
  jump-forward off: one token per step, the mask's cost alone), ``free`` (no constraint,
  ``ignore_eos`` and each request's ``max_tokens`` set to the token count its constrained twin
  produced, so both generate the same tokens) and ``constrained_jf`` (jump-forward on), back
  to back, ``--rounds`` times. Reported: each round's output tokens per second, the median
  over rounds of each variant's ratio to ``free`` by wall time and by process CPU time (the
  machine is shared: wall time swings with other load, CPU time much less), and the time
  spent in the sampler's grammar steps (mask fill + unpack + apply, advancing the matcher)
  as a share of the constrained run: the profile of where the cost goes.
- **validity**: ``--objects`` (200) constrained requests, 20 per schema, all in one batch;
  every output is parsed and validated with ``jsonschema``.

Writes ``benchmarks/results/structured_output.json``::

    PYTHONPATH=. python benchmarks/structured_output.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.core.sampling import StructuredOutput
from tokenmill.engine.executor.sampler import Sampler

NAME = {"type": "string", "minLength": 1, "maxLength": 40}
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "city": NAME,
            "country": NAME,
            "population": {"type": "integer", "minimum": 0},
        },
        "required": ["city", "country", "population"],
    },
    {
        "type": "object",
        "properties": {
            "title": NAME,
            "price": {"type": "number", "minimum": 0},
            "in_stock": {"type": "boolean"},
        },
        "required": ["title", "price", "in_stock"],
    },
    {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue", "yellow"]},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["colors"],
    },
    {
        "type": "object",
        "properties": {
            "event": NAME,
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        },
        "required": ["event", "date"],
    },
    {
        "type": "object",
        "properties": {
            "author": {
                "type": "object",
                "properties": {"first": NAME, "last": NAME},
                "required": ["first", "last"],
            },
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        },
        "required": ["author", "year"],
    },
    {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["sentiment", "score"],
    },
    {
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
        },
        "required": ["steps"],
    },
    {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.com$"},
            "active": {"type": "boolean"},
        },
        "required": ["id", "email", "active"],
    },
    {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"circle": {"type": "number", "minimum": 0}},
                        "required": ["circle"],
                    },
                    {
                        "type": "object",
                        "properties": {"square": {"type": "number", "minimum": 0}},
                        "required": ["square"],
                    },
                ]
            },
            "label": {"type": ["string", "null"], "maxLength": 20},
        },
        "required": ["shape", "label"],
    },
]


def _closed(schema: Any) -> Any:
    """Every object schema with ``additionalProperties: false`` (as OpenAI's strict mode)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out:
        out["additionalProperties"] = False
    return out


SCHEMAS = [_closed(s) for s in SCHEMAS]
TOPICS = ["a person", "a city", "a product", "colors", "an event", "a book", "a review",
          "a recipe", "a user", "a shape"]  # fmt: skip


def prompts(llm: LLM, count: int) -> list[tuple[int, list[int]]]:
    """(schema index, chat prompt ids) for ``count`` requests, cycling through the schemas."""
    out = []
    for i in range(count):
        k = i % len(SCHEMAS)
        text = (
            f"Write a JSON object about {TOPICS[k]} (example {i}) matching this schema: "
            f"{json.dumps(SCHEMAS[k])}"
        )
        ids = llm.tokenizer.encode_chat([{"role": "user", "content": text}])
        out.append((k, ids))
    return out


def constrained_params(k: int, seed: int, max_tokens: int) -> SamplingParams:
    spec = StructuredOutput(json_schema=json.dumps(SCHEMAS[k]), lenient=False)
    return SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed, structured=spec)


class GrammarTimer:
    """Wall time inside the sampler's grammar steps (mask, advance), summed."""

    def __init__(self) -> None:
        self.mask_s = self.advance_s = 0.0
        self.num_steps = 0
        mask, advance = Sampler._mask_grammars, Sampler._advance_grammars

        def timed_mask(sampler, *a):
            t = time.perf_counter()
            try:
                return mask(sampler, *a)
            finally:
                self.mask_s += time.perf_counter() - t
                self.num_steps += 1

        def timed_advance(sampler, *a):
            t = time.perf_counter()
            try:
                return advance(sampler, *a)
            finally:
                self.advance_s += time.perf_counter() - t

        Sampler._mask_grammars = timed_mask  # type: ignore[method-assign]
        Sampler._advance_grammars = timed_advance  # type: ignore[method-assign]


def run(llm: LLM, batch: list[tuple[int, list[int]]], params: list[SamplingParams]):
    """(results, wall seconds, process CPU seconds) of one batch run to completion."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = llm.generate([ids for _, ids in batch], params)
    return results, time.perf_counter() - wall, time.process_time() - cpu


VARIANTS = ("free", "constrained_no_jf", "constrained_jf")


def throughput(llm: LLM, args, timer: GrammarTimer) -> dict[str, Any]:
    """Rounds of the three variants back to back (the same prompts and token counts); the
    per-round ratios to ``free`` (wall and CPU time) and their medians."""
    batch = prompts(llm, args.concurrency)
    sampler = llm.core.executor.sampler
    per_round: list[dict[str, Any]] = []
    for r in range(args.rounds):
        params = [
            constrained_params(k, r * 1000 + i, args.max_tokens) for i, (k, _) in enumerate(batch)
        ]
        sampler.jump_forward = False
        mark = timer.mask_s + timer.advance_s, timer.num_steps
        out, wall, cpu = run(llm, batch, params)
        counts = [max(1, len(o.token_ids)) for o in out]
        grammar_s = timer.mask_s + timer.advance_s - mark[0]
        row: dict[str, Any] = {
            "constrained_no_jf": (sum(counts), wall, cpu),
            "grammar_s": grammar_s,
            "grammar_steps": timer.num_steps - mark[1],
        }
        free = [
            SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.7, seed=i)
            for i, n in enumerate(counts)
        ]
        out, wall, cpu = run(llm, batch, free)
        row["free"] = (sum(len(o.token_ids) for o in out), wall, cpu)
        sampler.jump_forward = True
        out, wall, cpu = run(llm, batch, params)
        row["constrained_jf"] = (sum(len(o.token_ids) for o in out), wall, cpu)
        sampler.jump_forward = False
        for v in VARIANTS:
            n, wall, cpu = row[v]
            row[v] = {"tokens": n, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": n / wall}
        row["grammar_share_of_wall"] = grammar_s / row["constrained_no_jf"]["wall_s"]
        per_round.append(row)
        print(
            f"round {r}: "
            + ", ".join(f"{v} {row[v]['tokens_per_s']:.1f} tok/s" for v in VARIANTS)
            + f", grammar {100 * row['grammar_share_of_wall']:.1f}% of the constrained run"
        )

    def ratio(v: str, key: str) -> float:
        per = [
            (row[v]["tokens"] / row[v][key]) / (row["free"]["tokens"] / row["free"][key])
            for row in per_round
        ]
        return statistics.median(per)

    steps = sum(r["grammar_steps"] for r in per_round)
    return {
        "concurrency": args.concurrency,
        "rounds": per_round,
        "median_ratio_to_free_wall": {v: ratio(v, "wall_s") for v in VARIANTS[1:]},
        "median_ratio_to_free_cpu": {v: ratio(v, "cpu_s") for v in VARIANTS[1:]},
        "median_grammar_share_of_wall": statistics.median(
            r["grammar_share_of_wall"] for r in per_round
        ),
        "grammar_ms_per_step": 1e3 * sum(r["grammar_s"] for r in per_round) / max(1, steps),
    }


def validity(llm: LLM, args) -> dict[str, Any]:
    batch = prompts(llm, args.objects)
    params = [
        constrained_params(k, 7 + i, args.validity_max_tokens) for i, (k, _) in enumerate(batch)
    ]
    out, secs, _ = run(llm, batch, params)
    failures = []
    for (k, _), o in zip(batch, out, strict=True):
        try:
            jsonschema.validate(json.loads(o.text), SCHEMAS[k])
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append(
                {
                    "schema": k,
                    "finish": str(o.finish_reason),
                    "text": o.text[:200],
                    "error": str(e)[:200],
                }
            )
    examples = [json.loads(o.text) for o in out[: len(SCHEMAS)] if not failures]
    return {
        "num_objects": len(out),
        "num_schemas": len(SCHEMAS),
        "num_valid": len(out) - len(failures),
        "failures": failures[:10],
        "seconds": secs,
        "examples": examples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: SmolLM2-135M)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--validity-max-tokens", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/structured_output.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    llm = LLM(args.model, max_num_seqs=256, max_num_batched_tokens=4096)
    timer = GrammarTimer()
    llm.generate(["warm up"], SamplingParams(max_tokens=4))
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "device": str(llm.core.executor.device),
        "threads": torch.get_num_threads(),
        "throughput": throughput(llm, args, timer),
        "validity": validity(llm, args),
        "note": "2-core development machine shared with other work: ratios, not absolutes",
    }
    t = result["throughput"]
    print(
        f"constrained/free (median of rounds, wall / CPU): no jump-forward "
        f"{t['median_ratio_to_free_wall']['constrained_no_jf']:.3f} / "
        f"{t['median_ratio_to_free_cpu']['constrained_no_jf']:.3f}, jump-forward "
        f"{t['median_ratio_to_free_wall']['constrained_jf']:.3f} / "
        f"{t['median_ratio_to_free_cpu']['constrained_jf']:.3f}; grammar "
        f"{t['grammar_ms_per_step']:.2f} ms/step, "
        f"{100 * t['median_grammar_share_of_wall']:.1f}% of the constrained run; valid "
        f"{result['validity']['num_valid']}/{result['validity']['num_objects']}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
