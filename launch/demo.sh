#!/usr/bin/env bash
# Install, then pretrain the demo SLoPe model with 2 data-parallel CPU processes.
# Rerunning resumes from the newest checkpoint. Extra args go to pretrain.py (--set ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
source launch/env.sh
NPROC=${NPROC:-2}
deepspeed --num_gpus "$NPROC" launch/pretrain.py --config configs/demo.yaml "$@"
