"""What crosses processes about moving a request's KV blocks (disaggregated prefill/decode):
the KV layout a worker registers and the transfer parameters a request carries.

One request's life in a P/D split (``KvTransferParams`` on each leg)::

    frontend ──EngineRequest(do_remote_decode)──▶ prefill worker: prefill + first token,
             ◀─RequestOutput(params: agent, block ids, hashes, checksums)── holds the blocks
    frontend ──EngineRequest(prompt + first token, do_remote_prefill, params)──▶ decode worker:
             allocates, READs the blocks it misses, checks them, tells the prefill worker,
             decodes

msgspec structs (the same objects in one process and across), versioned with the request.
"""

from __future__ import annotations

import msgspec

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


class KvLayout(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of one worker's paged KV cache: per layer one K and one V tensor
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` of ``dtype``. Two workers can move
    blocks only when their layouts are equal (``num_blocks`` may differ)."""

    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def bytes_per_block_layer(self) -> int:
        """Bytes of one block of K (or of V) in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * _ITEMSIZE[self.dtype]

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block holds over every layer, K and V."""
        return 2 * self.num_layers * self.bytes_per_block_layer

    def describe(self) -> str:
        return (
            f"{self.dtype}, block {self.block_size}, {self.num_layers} layers, "
            f"{self.num_kv_heads} KV heads of dim {self.head_dim}"
        )


_layout_encoder = msgspec.json.Encoder()
_layout_decoder = msgspec.json.Decoder(KvLayout)


def encode_layout(layout: KvLayout) -> str:
    """The layout as a registration-metadata string (JSON)."""
    return _layout_encoder.encode(layout).decode()


def decode_layout(text: str) -> KvLayout:
    """Raises ``msgspec.DecodeError`` / ``ValidationError`` for a malformed layout."""
    return _layout_decoder.decode(text)


class KvTransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """A request's KV-transfer leg (None on a request that moves no KV).

    - To a prefill worker: ``do_remote_decode`` (hold the prompt's blocks for a decode
      worker's READ, until it reports done, the frontend aborts, or the transfer timeout).
    - From it (its last output): where the blocks are: ``remote_engine_id`` (its NIXL agent
      name) with ``remote_agent_metadata`` (the agent's connection info, exchanged over the
      request plane), ``remote_request_id`` (the id its hold is known by), ``remote_block_ids``
      (blocks covering the first ``num_tokens`` prompt tokens, the last one maybe partial),
      ``block_hashes`` (chained hashes of the full ones, ``core.block_hash``), ``checksums``
      (one per block in ``remote_block_ids``: XXH3-64 of a sample of its bytes) and ``layout``.
    - To a decode worker: the same, with ``do_remote_prefill`` set and ``do_remote_decode``
      cleared; its prompt is the prefill worker's prompt plus the first token.
    """

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str = ""
    remote_agent_metadata: bytes = b""
    remote_request_id: str = ""
    remote_block_ids: list[int] = []
    block_hashes: list[int] = []
    num_tokens: int = 0
    checksums: list[int] = []
    layout: KvLayout | None = None

    def for_decode(self) -> KvTransferParams:
        """The parameters as a decode worker's request carries them."""
        return msgspec.structs.replace(self, do_remote_decode=False, do_remote_prefill=True)
