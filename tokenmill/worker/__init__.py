"""L3: a worker serves one engine replica as a runtime endpoint."""
