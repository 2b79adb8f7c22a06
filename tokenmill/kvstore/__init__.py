"""Storage of KV blocks in the lower tiers (host memory, local disk, a shared remote store):
the bytes behind ``tokenmill.kv.tiers``' placement. No torch (the executor copies between its
tensors and these buffers), no NATS client (that stays in ``tokenmill.runtime``)."""
