#!/usr/bin/env bash
# Install slope_megatron and its dependencies into the current Python, idempotently.
# - torch: kept if already importable (a cluster image's CUDA build). Otherwise, with
#   nvidia-smi on PATH, the newest torch>=2.4,<2.15 the index serves (PyPI: a CUDA build);
#   without it, torch==2.13.0. Both come from TORCH_INDEX_URL when it is set, else from
#   pip's configured index. On a CPU machine that is the CPU build only where that index
#   serves one (a local mirror or wheel dir may): stock PyPI serves Linux's multi-GB CUDA
#   build, so there set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. The script
#   says which case it is in before pip starts, and which build it got at the end.
# - DeepSpeed imports torch in its setup.py, hence --no-build-isolation.
# - DeepSpeed's C++ op cache goes to this checkout's .torch_extensions/; with nvidia-smi the
#   project's kernels are built there now (PREBUILD_KERNELS=0 skips it).
# - EXTRAS picks setup.py's extras (default: test); CONSTRAINTS=FILE pins every package pip
#   installs to FILE's versions (tests/run.sh passes tests/constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    from="from TORCH_INDEX_URL=$TORCH_INDEX_URL"
  else
    from="from pip's configured index (TORCH_INDEX_URL unset)"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    spec="torch>=2.4,<2.15"
    echo "installing the newest $spec $from (nvidia-smi found)"
  else
    spec="torch==2.13.0"
    echo "installing $spec $from (no nvidia-smi: a CPU machine)"
    if [[ -z "${TORCH_INDEX_URL:-}" ]]; then
      echo "note: that is the CPU build only if the index serves one (a local mirror may);" \
           "stock PyPI serves the multi-GB CUDA build for Linux - for the CPU build, stop" \
           "(Ctrl-C) and rerun with TORCH_INDEX_URL=$CPU_INDEX" >&2
    fi
  fi
  "$PY" -m pip install -q "$spec" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
else
  echo "keeping the torch already installed (import torch works)"
fi
"$PY" -m pip install -q setuptools wheel
"$PY" -m pip install -q --no-build-isolation ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e ".[${EXTRAS:-test}]"
# On a GPU machine, build the project's kernels now (the cuSPARSELt binding and the native
# layer step) into TORCH_EXTENSIONS_DIR (launch/env.sh's .torch_extensions/ unless set), which
# launch/slurm/pretrain.sbatch shares with every node: the first job then loads them instead
# of every rank waiting ~40 s on one build at start-up - the window in which a killed job
# leaves a build lock behind (slope_megatron/build_lock.py clears such locks). PREBUILD_KERNELS=0
# skips it; a build that fails here is said and left to the first use.
if command -v nvidia-smi >/dev/null 2>&1 && [[ "${PREBUILD_KERNELS:-1}" != 0 ]]; then
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
  echo "prebuilding the kernels into $TORCH_EXTENSIONS_DIR (PREBUILD_KERNELS=0 skips this)"
  "$PY" docker/prebuild_kernels.py --lenient
fi
echo "installed: $("$PY" -c 'import torch, deepspeed
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print("torch", torch.__version__, f"({build}) | deepspeed", deepspeed.__version__)' 2>/dev/null)"
