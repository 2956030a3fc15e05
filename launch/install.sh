#!/usr/bin/env bash
# Install slope_megatron and its dependencies into the current Python, idempotently.
# - torch: kept if already importable (a cluster image's CUDA build); otherwise the CPU
#   build torch==2.13.0 on a machine without a GPU (never a multi-GB CUDA build there).
# - DeepSpeed imports torch in its setup.py, hence --no-build-isolation.
# - DeepSpeed's C++ op cache goes to this checkout's .torch_extensions/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "installing a CUDA build of torch (GPU found)"
    "$PY" -m pip install -q "torch>=2.4,<2.15"
  else
    # Stock PyPI serves the CUDA build for Linux x86_64 even here: set TORCH_INDEX_URL to
    # PyTorch's CPU wheel index to get the CPU build (a mirror may already serve it by default)
    echo "installing torch==2.13.0 (CPU build${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL})"
    "$PY" -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
"$PY" -m pip install -q setuptools wheel
"$PY" -m pip install -q --no-build-isolation -e ".[${EXTRAS:-test}]"
echo "installed: $("$PY" -c 'import torch, deepspeed; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null)"
