# Sourced by the launch scripts: per-checkout caches and quiet, CPU-friendly defaults.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}"
export PYTHONUNBUFFERED=1
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one BLAS thread per CPU rank
fi
