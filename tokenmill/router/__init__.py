"""L2: router core: KV indexer, active sequences, routing policies, queue (pure, no I/O)."""
