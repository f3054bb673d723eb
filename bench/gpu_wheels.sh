#!/usr/bin/env bash
# Run HERE (a machine with pip access), once, before bench/gpu_check.sh on a lent GPU machine: the
# Python 3.12 wheels that machine's image lacks (its python3 has torch, triton, transformers,
# grpcio, pytest, ...; nothing can be fetched there). About 45 MB, into .whl/ (git-ignored), which
# the device run carries: run(command="bash bench/gpu_check.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  peft==0.21.2 bitsandbytes==0.50.2 pluggy grpcio-health-checking grpcio-reflection protobuf prometheus-client \
  fastapi uvicorn starlette annotated-doc gguf pyyaml pytest-timeout
du -sh .whl
