#!/usr/bin/env bash
# Builds .venv on a fresh machine. torchrec's metadata pins the CUDA fbgemm-gpu, which fails to load on a
# CPU-only machine, so torch and the matching fbgemm build go in first and torchrec follows with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  variant=cuda
  FBGEMM_PACKAGE="fbgemm-gpu==$FBGEMM_VERSION"
else
  variant=cpu
  FBGEMM_PACKAGE="fbgemm-gpu-cpu==$FBGEMM_VERSION"
fi
echo "setup: installing the $variant stack into $VENV"

$PIP install --quiet "torch==$TORCH_VERSION"
$PIP install --quiet "$FBGEMM_PACKAGE"
$PIP install --quiet --no-deps "torchrec==$TORCHREC_VERSION"
# torchrec's own requirements (torchmetrics pinned as torchrec pins it), less fbgemm-gpu (installed above in
# the right variant). pip's resolver will keep reporting torchrec's unmet "fbgemm-gpu" requirement from here on:
# that is expected, the -cpu build provides the same module.
$PIP install --quiet tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath
# The project, its runtime stack and dev tools; torch and torchrec are already satisfied.
$PIP install --quiet -e ".[dev]"

$VENV/bin/python - <<'PY'
import fbgemm_gpu  # noqa: F401  (registers the fbgemm ops)
import torch
import torchrec

print(f"setup: torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '?'}"
      f", cuda={torch.cuda.is_available()}")
PY
