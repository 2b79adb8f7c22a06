"""Test helpers shared by several test directories, imported as ``helpers.<module>``
(pytest's ``pythonpath = ["tests"]`` puts ``tests/`` on ``sys.path``; no test edits it):

- ``tiny_models``: tiny random HF model directories and ``TEST_DEVICE``;
- ``gguf_fixtures``: tiny GGUF files and GGUF tokenizer metadata;
- ``procs``: free loopback ports and ``tokenmill`` subprocesses (serve, any command);
- ``servers``: an in-process stack served by uvicorn in the test's event loop.

Fixtures built on them (the tiny model directory, a NATS server) are in ``tests/conftest.py``.
A helper used by one directory only stays next to its tests.
"""
