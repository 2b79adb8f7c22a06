"""Incremental detokenization with stop strings: the one module the offline API and the HTTP
frontend both use to turn a stream of token ids into a stream of text deltas.

Two stages run per pushed batch of token ids:

1. **Decoding** (vLLM's prefix/read offsets). Only a short window of ids is decoded each step::

       ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                   \\__ already emitted __/\\___ not yet emitted ___/

   ``decode(ids[prefix:read])`` is text already emitted; ``decode(ids[prefix:])`` minus it is
   the candidate delta. Decoding from ``prefix_offset`` (not from ``read_offset``) keeps the
   context a tokenizer needs (a SentencePiece leading space, a byte-level token that completes
   an earlier one). A candidate ending in U+FFFD ends in an incomplete UTF-8 character: the
   complete characters before it are emitted, the tail waits for the token that completes it
   (the offsets stay put meanwhile), so a character is never split or garbled. If
   ``MAX_PENDING_TOKENS`` more ids complete no character, the bytes are invalid rather than
   incomplete, and the replacement characters are emitted (as a full decode shows them).

2. **Stop strings.** Text is released only up to the longest suffix that could still be the
   start of a stop string; that suffix is held back. When a stop string appears, the text
   before it is released, ``stopped`` becomes True, ``stop_reason`` names the stop string, and
   every later ``push`` returns "". Stop strings never appear in the output. ``flush()`` at the
   end of a request releases what is held back (and any pending incomplete bytes).

Pure Python and per request; the per-token cost is two decodes of a window of a few ids plus a
scan of at most ``max(len(stop)) - 1 + len(delta)`` characters, independent of output length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

DecodeFn = Callable[[Sequence[int]], str]

# A UTF-8 character is at most 4 bytes, so at most 4 byte-level (or byte-fallback) tokens.
MAX_PENDING_TOKENS = 4
# Ids of the prompt decoded as context for the first output token (as vLLM does).
PROMPT_CONTEXT_TOKENS = 5


class StopStringMatcher:
    """Holds back text that may begin a stop string; finds the first stop string in the text.

    ``feed(text)`` returns the text safe to release. Once a stop string is found, ``stop_reason``
    is set, the text before it is released, and later feeds return "". ``release()`` returns
    and forgets the held-back text (call it at the end of the stream, never after a stop).
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1
        self._held = ""
        self.stop_reason: str | None = None

    def feed(self, text: str) -> str:
        if not self.stop:
            return text
        if self.stop_reason is not None:
            return ""
        buf = self._held + text
        hit = self._first_stop(buf)
        if hit is not None:
            index, self.stop_reason = hit
            self._held = ""
            return buf[:index]
        num_hold = self._num_hold(buf)
        self._held = buf[len(buf) - num_hold :]
        return buf[: len(buf) - num_hold]

    def release(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        """The earliest stop string in ``buf`` (earliest start; the first listed on a tie)."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            index = buf.find(s)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, s)
        return best

    def _num_hold(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


class IncrementalDetokenizer:
    """Turns one request's output token ids into safe text deltas, applying stop strings.

    ``decode`` maps a list of ids to text (bind ``skip_special_tokens`` into it).
    ``prompt_token_ids`` (optional) gives the first output token its decoding context, so a
    tokenizer that drops a leading space at the start of a decode still gets it right.
    Not thread-safe; one instance per request.
    """

    def __init__(
        self,
        decode: DecodeFn,
        stop: Sequence[str] = (),
        prompt_token_ids: Sequence[int] = (),
    ):
        self._decode = decode
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._grown_at = len(context)  # len(ids) when the emitted text last grew
        self._num_emitted = 0  # chars of the pending window's new text already emitted
        self._matcher = StopStringMatcher(stop)
        self.num_output_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._matcher.stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._matcher.stop_reason

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Appends ids; returns the newly released text ("" once stopped)."""
        matcher = self._matcher
        if matcher.stop_reason is not None:
            return ""
        self._ids.extend(new_token_ids)
        self.num_output_tokens += len(new_token_ids)
        return matcher.feed(self._decode_delta(final=False))

    def flush(self) -> str:
        """At the end of the request: the pending bytes and held-back text ("" if stopped)."""
        if self.stopped:
            return ""
        text = self._matcher.feed(self._decode_delta(final=True))
        return text + ("" if self.stopped else self._matcher.release())

    def _decode_delta(self, final: bool) -> str:
        ids, prefix, read = self._ids, self._prefix_offset, self._read_offset
        num_ids = len(ids)
        if read == num_ids:
            return ""
        prefix_text = self._decode(ids[prefix:read])
        full_text = self._decode(ids[prefix:])
        if full_text == prefix_text:  # ids that decode to nothing (skipped special tokens):
            del ids[read:]  # drop them so the window does not grow
            return ""
        if len(full_text) < len(prefix_text):
            return ""
        new_text = full_text[len(prefix_text) :]
        if (
            new_text.endswith("\ufffd")
            and not final
            and num_ids - self._grown_at <= MAX_PENDING_TOKENS
        ):
            return self._partial_delta(new_text)
        delta = new_text[self._num_emitted :] if self._num_emitted else new_text
        self._prefix_offset = read
        self._read_offset = self._grown_at = num_ids
        self._num_emitted = 0
        return delta

    def _partial_delta(self, new_text: str) -> str:
        """The complete characters before an incomplete tail; offsets stay put (a token
        boundary inside a character is no place to restart decoding)."""
        safe = new_text.rstrip("\ufffd")
        delta = safe[self._num_emitted :]
        if delta:
            self._num_emitted, self._grown_at = len(safe), len(self._ids)
        return delta


def detokenize_all(
    decode: DecodeFn, token_ids: Sequence[int], stop: Sequence[str] = ()
) -> tuple[str, str | None]:
    """Whole-output convenience: ``(text, stop_reason)`` as a streaming consumer would see it."""
    detok = IncrementalDetokenizer(decode, stop)
    text = "".join(detok.push([t]) for t in token_ids) + detok.flush()
    return text, detok.stop_reason
