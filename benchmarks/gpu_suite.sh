#!/usr/bin/env bash
# The GPU suite (see benchmarks/gpu_suite.py): one table of first audio, RTF, underruns and
# throughput at 1-32 sessions, the LM step per batch size and fp16/bf16 error, in under 8 minutes
# on one H100-class GPU.  On a machine without one: bash benchmarks/gpu_suite.sh --device cpu --quick
# Python: $PYTHON, else the repository's .venv (make setup), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec timeout 900 "$PYTHON" benchmarks/gpu_suite.py "$@"
