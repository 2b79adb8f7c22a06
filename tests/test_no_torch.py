"""The router, the mocker, the scheduler and the frontend must run without torch
(ARCHITECTURE.md: torch only under the engine's executor and models). import-linter checks the
static imports; this checks what importing these modules actually loads."""

import subprocess
import sys

import pytest

TORCH_FREE = [
    "tokenmill",
    "tokenmill.core.block_hash",
    "tokenmill.core.detokenize",
    "tokenmill.core.chat_template",
    "tokenmill.kv.block_pool",
    "tokenmill.kv.manager",
    "tokenmill.engine",
    "tokenmill.engine.scheduler",
    "tokenmill.engine.mocker",
    "tokenmill.router.router",
    "tokenmill.sim.replay",
    "tokenmill.launch.cli",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_does_not_load_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"importing {module} loads torch"
