#!/usr/bin/env bash
# Every check that needs a GPU, in one prepared run for the device tool (15 minutes a session):
# the `gpu`-marked tests, bench/lstm_cuda.py (also with --tf32x3), the CUDA LSTM rows of
# bench/converter.py with and without the persistent Triton kernels, then all its CUDA rows and
# bench/overhead.py's.
# Copy the numbers it prints into bench/README.md, naming the card.
#
# The device image has torch, onnx, onnxruntime, onnxscript, numpy, safetensors and pytest, but
# not pydantic. Before the call, on the development machine (repository root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic pydantic-core annotated-types typing-inspection typing-extensions
# then: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540).
# `--noconftest`: the gpu tests are engine/converter tests; the shared conftest needs the
# database stack, which the device image lacks (so do a few non-gpu test modules: their
# collection errors are expected and do not stop the gpu tests).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gradhealth-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, onnxruntime; print('torch', torch.__version__, torch.cuda.get_device_name(), 'onnxruntime', onnxruntime.__version__)"
# Most wanted first (issue 2's CUDA LSTM row), so that a run cut short still has it; the
# timeouts add up to the device tool's 600 s per call only if every step runs long.
timeout 150 python3 -m pytest -q -p no:cacheprovider --noconftest --continue-on-collection-errors \
  -m gpu tests/unit 2>&1 \
  | tee "$out/gpu_tests.log" | tail -15
timeout 90 python3 bench/lstm_cuda.py --repeats 20 2>&1 | tee "$out/lstm_cuda.txt"
timeout 40 python3 bench/lstm_cuda.py --repeats 20 --tf32x3 2>&1 | tee "$out/lstm_cuda_tf32x3.txt"
timeout 60 python3 bench/converter.py --device cuda --only lstm --skip-conversion 2>&1 \
  | tee "$out/converter_cuda_lstm.txt"
# the same rows with the persistent Triton kernels off (the per-step loops as CUDA graphs)
GRADHEALTH_LSTM_PERSISTENT=0 timeout 60 python3 bench/converter.py --device cuda --only lstm \
  --skip-conversion 2>&1 | tee "$out/converter_cuda_no_persistent.txt"
timeout 120 python3 bench/converter.py --device cuda 2>&1 | tee "$out/converter_cuda.txt"
timeout 120 python3 bench/overhead.py --device cuda --repeats 6 2>&1 | tee "$out/overhead_cuda.txt"
timeout 40 python3 bench/cuda_host_cost.py 2>&1 | tee "$out/cuda_host_cost.txt"
