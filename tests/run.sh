#!/usr/bin/env bash
# The test command: the whole CPU test suite in a clean virtual environment of its own.
#
#   bash tests/run.sh [pytest arguments]
#
# 1. .venv/ in this checkout (ignored by git) is created without the machine's site-packages
#    and the project is installed there exactly as the README says (launch/install.sh), with
#    every package pinned by tests/constraints.txt. It is reused while setup.py, install.sh
#    and the constraints are unchanged (a stamp records their digest); otherwise rebuilt.
# 2. pytest runs with that environment's python, PYTHONPATH and user site-packages cut off.
#    GPU tests are marked and skipped without CUDA; any other skip fails the run
#    (SLOPE_STRICT_SKIPS=1, see tests/conftest.py), so a missing dependency cannot hide.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
unset PYTHONPATH PYTHONHOME PIP_USER VIRTUAL_ENV
export PYTHONNOUSERSITE=1
stamp=$(cat setup.py launch/install.sh tests/constraints.txt | sha256sum | cut -c1-16)
if [[ ! -x $VENV/bin/python || "$(cat $VENV/.slope-stamp 2>/dev/null)" != "$stamp" ]]; then
  echo "tests/run.sh: building a clean environment in $VENV (stamp $stamp)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  PYTHON=$VENV/bin/python CONSTRAINTS=tests/constraints.txt EXTRAS=test bash launch/install.sh
  echo "$stamp" > $VENV/.slope-stamp
fi
export PATH="$PWD/$VENV/bin:$PATH"  # mpirun (mpich), shellcheck and the console scripts
source launch/env.sh
export SLOPE_STRICT_SKIPS=1
# a temporary directory of this run's own: pytest's shared /tmp/pytest-of-$USER keeps only the
# newest three sessions' folders, so other test sessions started meanwhile would delete this
# run's files under it (kept on failure, for a look; removed when every test passed)
basetemp=$(mktemp -d "${TMPDIR:-/tmp}/slope-tests.XXXXXX")
status=0
"$VENV/bin/python" -m pytest -q tests --basetemp "$basetemp" "$@" || status=$?
if [[ $status -eq 0 ]]; then rm -rf "$basetemp"; else echo "tests/run.sh: test files kept in $basetemp"; fi
exit $status
