"""vLLM as a tokenmill engine (``tokenmill worker --engine vllm``): vLLM's v1 ``AsyncLLM``
behind the worker's ``EngineClient`` contract, its KV events translated into ours.

Only this package imports vLLM (import-linter checks it), and only inside functions, so
importing any module here without vLLM installed works and the default install never needs
it. ``builder.build_vllm_engine`` is the entry point (the ``vllm`` engine kind).
"""
