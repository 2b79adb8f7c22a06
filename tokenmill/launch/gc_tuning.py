"""The garbage collector in long-running server processes (frontend, worker).

Everything a process allocates while starting (modules, tokenizer, FastAPI app, engine, KV
pool) lives until it exits, yet every full collection would scan it again, pausing the event
loop for milliseconds at random requests. ``freeze_startup_heap()``, called once a process is
ready, collects once and moves all of it to the permanent generation (``gc.freeze``), so later
collections scan only what requests allocate.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    gc.collect()
    gc.freeze()
