#!/usr/bin/env bash
# The project's one-command GPU check, for a lent GPU machine (never CI). First, here:
#   bash bench/gpu_wheels.sh
# then through the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540).
# It installs the carried wheels and adapterhub (its C extensions built there) under /tmp/site, then
# runs the GPU tests (exactness on nf4 and bf16 bases, hot-swap, bad input; the Triton kernels
# compiled for the GPU against the torch reference) and bench/gpu.py (tokens/s side by side:
# Triton vs the torch reference backend, 32 distinct LoRAs vs none). Logs go to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', b.__version__)"
cd tests  # the installed adapterhub, not the source tree's package dirs (they map through pyproject)
python3 -m pytest -q -s -p no:cacheprovider --timeout 300 test_gpu.py test_lora_triton.py test_lora_backends.py 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
cd ..
python3 -m bench.gpu 2>&1 | tee "$OUT/bench.log"
exit "$status"
