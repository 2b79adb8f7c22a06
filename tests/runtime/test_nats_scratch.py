"""Temporary JetStream stores of embedded nats-servers whose parent was killed (and so never
ran ``stop()``) are deleted by the next ``NatsServer``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tokenmill.runtime.nats_server import OWNER_FILE, STORE_PREFIX, NatsServer, remove_orphan_stores


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_stores_of_dead_owners_are_removed(tmp_path: Path):
    dead, alive, foreign = (tmp_path / f"{STORE_PREFIX}{n}" for n in ("dead", "alive", "foreign"))
    for path in (dead, alive, foreign):
        path.mkdir()
    (dead / OWNER_FILE).write_text(str(_dead_pid()))
    (alive / OWNER_FILE).write_text(str(os.getpid()))
    assert remove_orphan_stores(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and alive.exists() and foreign.exists()


def test_a_killed_parents_store_is_removed_by_the_next_server():
    code = (
        "from tokenmill.runtime.nats_server import NatsServer; import time\n"
        "s = NatsServer().start(); print(s.store_dir, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        store = Path(child.stdout.readline().strip())
        assert store.is_dir() and (store / OWNER_FILE).read_text() == str(child.pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert store.is_dir()  # nobody ran stop()
    server = NatsServer()
    try:
        assert not store.exists()
    finally:
        server.stop()
