"""The stored form of one KV block on disk and in a remote store: a fixed header, then the
block's bytes. A reader gets the bytes back only if every check passes; anything else is a
miss with a reason (never wrong data)::

    offset  0   magic    b"TMKV"
            4   version  u16  (RECORD_VERSION)
            6   -        u16  (zero)
            8   block_hash    u64  chained block hash (tokenmill.core.block_hash)
           16   fingerprint   u64  model / KV layout (``layout_fingerprint``)
           24   payload_len   u64
           32   checksum      u64  XXH3-64 of the payload
           40   payload ...

All integers little-endian. The host tier keeps its bytes in this process's memory and checks
only the block hash of a slot (see ``host.py``).
"""

from __future__ import annotations

import struct
from enum import Enum

import xxhash

MAGIC = b"TMKV"
RECORD_VERSION = 1
HEADER = struct.Struct("<4sHHQQQQ")
HEADER_BYTES = HEADER.size  # 40


class Miss(Enum):
    """Why a stored block was not returned (the ``reason`` label of the miss metric)."""

    ABSENT = "absent"
    TRUNCATED = "truncated"
    BAD_HEADER = "bad_header"
    WRONG_BLOCK = "wrong_block"
    WRONG_LAYOUT = "wrong_layout"
    CHECKSUM = "checksum"
    UNAVAILABLE = "unavailable"


def layout_fingerprint(model: str, dtype: str, block_size: int, shape: tuple[int, ...]) -> int:
    """A 64-bit fingerprint of what a block's bytes mean: the model's identity, the KV dtype,
    the block size and the per-block tensor shape. Blocks of another model or layout never
    match, so a shared store or an old disk directory cannot feed wrong KV."""
    key = f"{model}|{dtype}|{block_size}|{'x'.join(map(str, shape))}"
    return xxhash.xxh3_64_intdigest(key.encode())


def checksum(payload: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def encode_header(block_hash: int, fingerprint: int, payload: bytes | memoryview) -> bytes:
    return HEADER.pack(
        MAGIC, RECORD_VERSION, 0, block_hash, fingerprint, len(payload), checksum(payload)
    )


def encode(block_hash: int, fingerprint: int, payload: bytes | memoryview) -> bytes:
    """Header + payload as one bytes object (for stores that take one value)."""
    return encode_header(block_hash, fingerprint, payload) + bytes(payload)


def parse_header(header: bytes | memoryview) -> tuple[int, int, int, int] | Miss:
    """``(block_hash, fingerprint, payload_len, checksum)`` or why the header is unusable."""
    if len(header) < HEADER_BYTES:
        return Miss.TRUNCATED
    magic, version, _, block_hash, fingerprint, length, check = HEADER.unpack_from(header)
    if magic != MAGIC or version != RECORD_VERSION:
        return Miss.BAD_HEADER
    return block_hash, fingerprint, length, check


def decode(
    record: bytes | memoryview, block_hash: int, fingerprint: int, payload_len: int
) -> memoryview | Miss:
    """The payload of ``record`` if it is the block ``block_hash`` of layout ``fingerprint``,
    exactly ``payload_len`` bytes long and intact; else the first check that failed."""
    fields = parse_header(record)
    if isinstance(fields, Miss):
        return fields
    got_hash, got_fingerprint, length, check = fields
    if got_fingerprint != fingerprint:
        return Miss.WRONG_LAYOUT
    if got_hash != block_hash:
        return Miss.WRONG_BLOCK
    if length != payload_len:
        return Miss.BAD_HEADER
    payload = memoryview(record)[HEADER_BYTES : HEADER_BYTES + length]
    if len(payload) < length:
        return Miss.TRUNCATED
    if checksum(payload) != check:
        return Miss.CHECKSUM
    return payload
