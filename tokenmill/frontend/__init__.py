"""L3: OpenAI-compatible HTTP frontend (FastAPI)."""
