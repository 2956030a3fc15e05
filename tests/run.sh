#!/usr/bin/env bash
# Install, then run the whole CPU test suite (GPU tests are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
source launch/env.sh
python3 -m pytest -q tests "$@"
