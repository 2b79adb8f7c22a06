"""L1: KV block pool and prefix cache bookkeeping (pure Python, no torch)."""
