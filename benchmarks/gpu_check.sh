#!/usr/bin/env bash
# The engine's CUDA paths on a lent GPU machine, in one run (about 4-6 minutes on an H100):
#   1. installs the carried wheels (.whl/*.whl: msgspec, gguf, pytest-asyncio) into /tmp/site,
#      prints nvidia-smi, Python/torch/CUDA versions and checks the engine's imports;
#   2. the engine tests with TOKENMILL_TEST_DEVICE=cuda (models, paged attention, sampler,
#      engine core, LLM on the GPU; test_mocker.py is ignored: no device code);
#   3. benchmarks/gpu_bench.py: `tokenmill bench engine` on random-weight SmolLM2-135M- and
#      Llama-3.2-1B-shaped models in bf16 against transformers on the same device.
# Run from the repo root with .whl carried (it also holds aibrix_head.jsonl, the first 302
# rows of /work/shared/data/traces/8min_up_and_down.jsonl). Everything lands in $OUT:
# gpu_check.log, engine_<model>.json, bench_summary.json. Exits non-zero if any step failed.
# Knobs: GPU_CHECK_DEVICE (cuda), GPU_CHECK_SIZE (full | tiny), GPU_CHECK_INSTALL (1 | 0),
# GPU_CHECK_PYTEST_ARGS (-x), GPU_CHECK_MODELS (all shapes of the size). A CPU dry run:
#   OUT=/tmp/o GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=tiny GPU_CHECK_INSTALL=0 benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output directory}"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SIZE=${GPU_CHECK_SIZE:-full}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
step() { echo; echo "=== $* ($(date +%T), ${SECONDS}s)"; }

step "1. environment"
if [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "FAIL: wheel install"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi
$PY - <<'EOF' || { echo "FAIL: imports"; exit 1; }
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "tokenizers", "safetensors", "numpy", "msgspec", "gguf", "pytest",
             "pytest-asyncio", "pytest-timeout", "hypothesis", "xxhash", "jinja2"):
    print(f"  {name} {md.version(name)}")
import tokenmill.engine.core, tokenmill.engine.llm, tokenmill.engine.async_engine  # noqa
import tokenmill.bench.engine, tokenmill.bench.engine_hf  # noqa
print("tokenmill engine imports: ok")
EOF

step "2. engine tests on $DEVICE"
# shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of flags
TOKENMILL_TEST_DEVICE=$DEVICE timeout 180 $PY -m pytest tests/engine -rs \
    ${GPU_CHECK_PYTEST_ARGS:--x} -p no:cacheprovider --ignore=tests/engine/test_mocker.py
tests_rc=$?
echo "tests rc=$tests_rc"

step "3. engine bench on $DEVICE ($SIZE)"
timeout 270 $PY benchmarks/gpu_bench.py --trace .whl/aibrix_head.jsonl --out-dir "$OUT" \
    --device "$DEVICE" --size "$SIZE" ${GPU_CHECK_MODELS:+--models "$GPU_CHECK_MODELS"}
bench_rc=$?
echo "bench rc=$bench_rc"

step "done: tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
