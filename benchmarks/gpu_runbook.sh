#!/usr/bin/env bash
# The GPU half of issue #9, in a few device calls (docs/benchmarks.md, "On a GPU: the runbook").
#
# Run on the device machine from the repository root, one stage per call (each is meant to end well inside a
# 10-minute call):
#
#     bash benchmarks/gpu_runbook.sh STAGE        STAGE: tests | step | compiled | hessian | data-sweep
#
# Results go to $OUT (the device tool brings that folder back; at most 8 files a call), else to
# benchmarks/results. The image there has torch, numpy, typer, matplotlib, pytest, hypothesis, scipy and
# torchvision but not pytorch-optimizer, pyhessian, mnist1d or mlxtend: download their wheels into .whl/ here
# (pure Python, see the docs) and carry .whl; this script installs whatever .whl/ holds. DEVICE=cpu runs any
# stage on the CPU (to check the script itself; slow).
set -uo pipefail

stage=${1:?usage: bash benchmarks/gpu_runbook.sh tests|step|compiled|hessian|data-sweep}
case $stage in
    tests | step | compiled | hessian | data-sweep) ;;
    *) echo "unknown stage: $stage (expected tests, step, compiled, hessian or data-sweep)" >&2; exit 2 ;;
esac
out=${OUT:-benchmarks/results}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
"$python" - "$device" <<'EOF' | tee "$out/environment.txt" || exit 1
import sys

import torch

import sharpness

device = torch.device(sys.argv[1])
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(f"torch {torch.__version__}, sharpness {sharpness.__version__}, device {device} ({name})")
for package in ("pytorch_optimizer", "pyhessian", "mnist1d", "mlxtend"):
    try:
        __import__(package)
        print(f"{package}: importable")
    except ImportError:
        print(f"{package}: missing (carry its wheel in .whl/)")
EOF

case $stage in
    tests)  # the 176 device tests: every method on the device equals the CPU, host syncs counted, ...
        SHARPNESS_TEST_DEVICE=$device "$python" -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py \
            2>&1 | tee "$out/test_cuda.log"
        ;;
    step)  # SAM / (2 x SGD) and every method against its pass count, eager
        "$python" benchmarks/bench_step.py --device "$device" --models mlp cnn tiny deep \
            --json "$out/step-$device.json" 2>&1 | tee "$out/step-$device.txt"
        ;;
    compiled)  # the same with the model torch.compile'd (how a GPU user runs a small model)
        "$python" benchmarks/bench_step.py --device "$device" --models mlp cnn tiny deep --compile inductor \
            --json "$out/step-$device-compiled.json" 2>&1 | tee "$out/step-$device-compiled.txt"
        ;;
    hessian)  # top eigenvalue and trace against PyHessian, and the overhead against model size
        "$python" benchmarks/bench_hessian.py --device "$device" --json "$out/hessian-$device.json" \
            2>&1 | tee "$out/hessian-$device.txt"
        "$python" benchmarks/bench_scaling.py --device "$device" --json "$out/scaling-$device.json" \
            --plot "$out/bench_scaling_$device.png" 2>&1 | tee "$out/scaling-$device.txt"
        ;;
    data-sweep)  # the resident augmented-image path and sweep workers
        "$python" benchmarks/bench_data.py --device "$device" --workers 0 8 --json "$out/data-$device.json" \
            2>&1 | tee "$out/data-$device.txt"
        "$python" benchmarks/bench_sweep.py --device "$device" --jobs 8 --steps 2000 \
            --json "$out/sweep-$device.json" 2>&1 | tee "$out/sweep-$device.txt"
        ;;
esac
