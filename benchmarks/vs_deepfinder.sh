#!/usr/bin/env bash
# cryocaps side by side with DeepFinder 0.2.1 (see benchmarks/vs_deepfinder.py --help).
#   benchmarks/vs_deepfinder.sh --quick          # plumbing check, ~12 min on 2 cores
#   benchmarks/vs_deepfinder.sh                  # full run: 12-min budgets, 4 data sets x 4 tools, ~4 h
#   benchmarks/vs_deepfinder.sh --datasets procedural,structures --minutes 10   # 65 min measured
#   benchmarks/vs_deepfinder.sh --datasets crowded      # one data set, ~1 h
#   benchmarks/vs_deepfinder.sh --datasets crowded --models ''   # DeepFinder alone, ~15 min
#   benchmarks/vs_deepfinder.sh --reuse-training        # redo segment/pick/score on the last run's models
# PYTHON: the interpreter with cryocaps installed [default: python3 on PATH].
# The DeepFinder venv (benchmarks/.venv-deepfinder, ~2.3 GB) is made on first use.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c "import cryocaps" 2>/dev/null; then
    echo "vs_deepfinder.sh: $python cannot import cryocaps; set PYTHON=/path/to/venv/bin/python" >&2
    exit 2
fi
cd "$here/.."
exec "$python" "$here/vs_deepfinder.py" "$@"
