"""L0: ids, sampling params, block hash, KV events, errors, chat templates, detokenization."""
