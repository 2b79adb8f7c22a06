"""The stored block record: a round trip, and every way a record can be wrong is a miss."""

from __future__ import annotations

from tokenmill.kvstore import record
from tokenmill.kvstore.record import HEADER_BYTES, Miss

FP = record.layout_fingerprint("m", "bfloat16", 16, (30, 2, 16, 3, 64))
PAYLOAD = bytes(range(256)) * 4


def test_round_trip():
    rec = record.encode(7, FP, PAYLOAD)
    assert len(rec) == HEADER_BYTES + len(PAYLOAD)
    assert bytes(record.decode(rec, 7, FP, len(PAYLOAD))) == PAYLOAD


def test_fingerprint_depends_on_every_part_of_the_layout():
    others = [
        record.layout_fingerprint("n", "bfloat16", 16, (30, 2, 16, 3, 64)),
        record.layout_fingerprint("m", "float32", 16, (30, 2, 16, 3, 64)),
        record.layout_fingerprint("m", "bfloat16", 32, (30, 2, 16, 3, 64)),
        record.layout_fingerprint("m", "bfloat16", 16, (30, 2, 16, 3, 128)),
    ]
    assert FP not in others and len(set(others)) == 4


def test_every_mismatch_is_a_miss_with_its_reason():
    rec = bytearray(record.encode(7, FP, PAYLOAD))
    n = len(PAYLOAD)
    assert record.decode(rec, 8, FP, n) is Miss.WRONG_BLOCK
    assert record.decode(rec, 7, FP + 1, n) is Miss.WRONG_LAYOUT
    assert record.decode(rec, 7, FP, n + 1) is Miss.BAD_HEADER
    assert record.decode(rec[:-1], 7, FP, n) is Miss.TRUNCATED
    assert record.decode(rec[:10], 7, FP, n) is Miss.TRUNCATED
    assert record.decode(b"XXXX" + rec[4:], 7, FP, n) is Miss.BAD_HEADER
    rec[HEADER_BYTES + 100] ^= 1
    assert record.decode(rec, 7, FP, n) is Miss.CHECKSUM
