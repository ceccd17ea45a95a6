#!/usr/bin/env bash
# The accelerator machine's check, for when the device tool lends a GPU (under 8 minutes): the
# CUDA-only tests (they skip on every CI machine), then benchmarks/gpu.py, whose gpu.md/gpu.json
# land in $OUT (commit them as benchmarks/results/gpu.*; accelerators.md then shows them).
#
# That machine has its own python3 with torch, and no package index. Prepare here, once, the
# wheels of what it lacks, and Fashion-MNIST (../shared does not travel):
#   echo /.whl/ >> .git/info/exclude; echo /.fmnist/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl torch-pruning==1.6.1 paho-mqtt==2.2.0 pydantic==2.14.3 pydantic-core==2.50.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 tomli-w==1.2.0
#   mkdir -p .fmnist/fashion-mnist && cp ../shared/data/fashion-mnist/*.gz .fmnist/fashion-mnist/
# and run it with the device tool: command "bash benchmarks/device_check.sh",
# carry [".whl", ".fmnist"], timeout_s 540. (Ray's wheel is larger than what may travel: the
# Ray row of gpu.md then says Ray is not installed.)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
[ -d .fmnist ] && export CAHFP_DATA_DIR="$PWD/.fmnist"
out="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pytest -q -p no:cacheprovider tests/cahfp/test_compute_device.py 2>&1 | tee "$out/cuda_tests.log"
python3 -m benchmarks.gpu --out-dir "$out"
