"""Where NIXL cannot load, a prefill or decode role fails with a message that says why and
how to install it; nothing else imports NIXL (aggregated serving never needs it)."""

from __future__ import annotations

import sys

import pytest

from tokenmill.core.errors import KvTransferUnavailableError
from tokenmill.core.kv_transfer import KvLayout
from tokenmill.engine.builder import build_pd_connectors
from tokenmill.engine.executor.nixl_connector import load_nixl

LAYOUT = KvLayout(dtype="float32", block_size=16, num_layers=2, num_kv_heads=1, head_dim=8)


def test_missing_nixl_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl._api", None)  # import raises ImportError
    with pytest.raises(KvTransferUnavailableError, match="pip install --no-deps nixl") as info:
        load_nixl()
    assert "--role both" in str(info.value)
    with pytest.raises(KvTransferUnavailableError):
        build_pd_connectors(LAYOUT, 30.0)


def test_aggregated_engines_never_import_nixl():
    import subprocess

    code = (
        "import sys; from tokenmill.engine import builder, core, scheduler; "
        "import tokenmill.launch.engines; assert 'nixl' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
