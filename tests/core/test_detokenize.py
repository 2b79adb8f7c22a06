"""Incremental detokenization and stop strings on adversarial splits.

The fake tokenizer here is exactly what a byte-level BPE decode does: each id is a byte
string, and a decode is the UTF-8 decode of the concatenation with U+FFFD for bad bytes.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.detokenize import IncrementalDetokenizer, StopStringMatcher, detokenize_all


class ByteVocab:
    """Ids for byte strings, assigned on first use; ``decode`` as a byte-level tokenizer."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.num_decoded_ids = 0

    def ids(self, *pieces: bytes) -> list[int]:
        out = []
        for piece in pieces:
            if piece not in self.pieces:
                self.pieces.append(piece)
            out.append(self.pieces.index(piece))
        return out

    def decode(self, ids) -> str:
        self.num_decoded_ids += len(ids)
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream(
    vocab: ByteVocab, pieces: list[bytes], stop=()
) -> tuple[list[str], IncrementalDetokenizer]:
    """Pushes one token at a time; returns the deltas (flush last) and the detokenizer."""
    detok = IncrementalDetokenizer(vocab.decode, stop)
    deltas = [detok.push(vocab.ids(p)) for p in pieces]
    deltas.append(detok.flush())
    return deltas, detok


def split_bytes(text: str) -> list[bytes]:
    return [bytes([b]) for b in text.encode("utf-8")]


def test_emoji_split_into_single_bytes_is_emitted_whole():
    deltas, detok = stream(ByteVocab(), [b"Hi "] + split_bytes("🚀") + [b"!"])
    assert deltas == ["Hi ", "", "", "", "🚀", "!", ""]
    assert detok.stop_reason is None and not detok.stopped


def test_cjk_split_mid_character_never_yields_replacement_char():
    raw = "東京".encode()  # 6 bytes: two 3-byte characters
    pieces = [raw[:2], raw[2:4], raw[4:]]  # every boundary falls inside a character
    deltas, _ = stream(ByteVocab(), pieces)
    assert deltas == ["", "東", "京", ""]


def test_stop_string_spanning_tokens_is_cut_and_never_emitted():
    deltas, detok = stream(ByteVocab(), [b"Hel", b"lo w", b"orld", b"!"], stop=["o wor"])
    assert deltas == ["Hel", "l", "", "", ""]
    assert detok.stopped and detok.stop_reason == "o wor"


def test_stop_string_at_the_very_start():
    deltas, detok = stream(ByteVocab(), [b"<", b"/s", b">rest"], stop=["</s>"])
    assert deltas == ["", "", "", ""]
    assert detok.stop_reason == "</s>"


def test_partial_match_that_fails_is_released():
    deltas, detok = stream(ByteVocab(), [b"ab", b"ab", b"x", b"abc"], stop=["abc"])
    # "ab" is held; "abab" holds the second "ab"; "ababx" releases it all; "abc" stops.
    assert deltas == ["", "ab", "abx", "", ""]
    assert detok.stop_reason == "abc"


def test_several_stop_strings_earliest_wins():
    deltas, detok = stream(ByteVocab(), [b"one two three"], stop=["three", "two", "ne t"])
    assert deltas == ["o", ""]
    assert detok.stop_reason == "ne t"


def test_flush_releases_held_back_text():
    deltas, detok = stream(ByteVocab(), [b"the end ST"], stop=["STOP"])
    assert deltas == ["the end ", "ST"]
    assert not detok.stopped


def test_flush_releases_pending_invalid_bytes_like_a_full_decode():
    vocab = ByteVocab()
    deltas, _ = stream(vocab, [b"a", b"\xe4\xb8"])  # a truncated 3-byte character
    assert deltas == ["a", "", "\ufffd"]


def test_invalid_bytes_are_emitted_after_max_pending_tokens():
    vocab = ByteVocab()
    detok = IncrementalDetokenizer(vocab.decode)
    out = [detok.push(vocab.ids(p)) for p in [b"x", b"\xff", b"\xfe", b"\xfd", b"\xfc", b"\xfb"]]
    assert out == ["x", "", "", "", "", "\ufffd" * 5]


def test_push_after_stop_returns_nothing_and_counts_tokens():
    vocab = ByteVocab()
    detok = IncrementalDetokenizer(vocab.decode, stop=["X"])
    assert detok.push(vocab.ids(b"aX", b"b")) == "a"
    assert detok.push(vocab.ids(b"c")) == ""
    assert detok.flush() == ""
    assert detok.num_output_tokens == 2


def test_prompt_context_is_decoded_but_not_emitted():
    vocab = ByteVocab()
    prompt = vocab.ids(b"<p>", b"ro", b"mpt")
    detok = IncrementalDetokenizer(vocab.decode, prompt_token_ids=prompt)
    assert detok.push(vocab.ids(b" answer")) == " answer"


def test_ids_that_decode_to_nothing_do_not_grow_the_window():
    vocab = ByteVocab()
    detok = IncrementalDetokenizer(vocab.decode)
    detok.push(vocab.ids(b"a"))
    vocab.num_decoded_ids = 0
    for _ in range(100):
        assert detok.push(vocab.ids(b"")) == ""  # e.g. a skipped special token
    assert vocab.num_decoded_ids <= 100 * 4  # a bounded window per step, not the whole output


def test_per_token_cost_does_not_grow_with_output_length():
    vocab = ByteVocab()
    detok = IncrementalDetokenizer(vocab.decode, stop=["never appears"])
    for _ in range(1000):
        detok.push(vocab.ids(b"w"))
    vocab.num_decoded_ids = 0
    detok.push(vocab.ids(b"w"))
    assert vocab.num_decoded_ids == 3  # decode([prev]) and decode([prev, new])


def test_matcher_holds_only_a_prefix_of_a_stop_string():
    matcher = StopStringMatcher(["xyz"])
    assert matcher.feed("axy") == "a"
    assert matcher.release() == "xy"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=20),
    stops=st.lists(st.text(min_size=1, max_size=4), max_size=3),
)
def test_any_split_equals_full_text_cut_at_first_stop(text, cuts, stops):
    raw = text.encode("utf-8")
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    pieces = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    vocab = ByteVocab()
    deltas, detok = stream(vocab, pieces, stop=stops)
    hits = [(text.find(s), i) for i, s in enumerate(stops) if s in text]
    expected = text[: min(hits)[0]] if hits else text
    assert "".join(deltas) == expected
    assert detok.stopped == bool(hits)
    assert all("\ufffd" not in d for d in deltas)
    if hits:
        assert detok.stop_reason == stops[min(hits)[1]]


def test_detokenize_all_matches_streaming():
    vocab = ByteVocab()
    ids = vocab.ids(*split_bytes("naïve café STOP more"))
    assert detokenize_all(vocab.decode, ids, stop=["STOP"]) == ("naïve café ", "STOP")
