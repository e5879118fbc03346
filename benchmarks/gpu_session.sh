#!/usr/bin/env bash
# A session with a lent GPU (the `device` tool), in stages that each fit one 10-minute command:
#
#   bash benchmarks/gpu_session.sh prepare     # here, with PyPI: the wheels the GPU machine lacks, in .whl/
#   then each of these as one device `run` with carry [".whl"]; logs and JSON land in $OUT:
#   bash benchmarks/gpu_session.sh tests [PYTEST ARGS]   # the Triton suite (default: all of tests/triton)
#   bash benchmarks/gpu_session.sh rerun                 # the design points whose frozen-MLP cases
#                                                        # failed on an H100 (2026-11-23; README)
#   bash benchmarks/gpu_session.sh bench [ARGS]          # benchmarks/gpu_kernels.py (issue 4's table)
#
# The machine's image has torch 2.11 and Triton 3.6 but not lark (nlc's parser), fla-core,
# titans-pytorch or its dependencies. Triton 3.6 miscompiles one of fla's gated delta kernels on Hopper
# (fla refuses it, fla issue #640), so `prepare` also packs Triton 3.7.1 for Python 3.12, slimmed
# under the 64 MiB a call may carry: libtriton.so stripped; CUPTI, proton, the AMD backend and the
# Blackwell ptxas left out; the rest xz-compressed.
set -euo pipefail
stage=${1:?usage: gpu_session.sh prepare | tests [PYTEST ARGS] | rerun | bench [ARGS]}
shift
cd "$(dirname "$0")/.."

# the (pure-Python) wheels the GPU image lacks, pinned to what the CPU
# benchmarks ran with
WHEELS=(lark==1.3.1 interegular==0.3.3 fla-core==0.6.0 titans-pytorch==0.5.5 assoc-scan==0.0.6
        accelerated-scan==0.3.1 axial_positional_embedding==0.3.12 einx==0.4.3 frozendict==2.5.1
        hyper-connections==0.4.11 torch-einops-utils==0.2.0 rotary-embedding-torch==0.9.1
        tensordict==0.15.3 pyvers==0.2.3 x-transformers==2.31.10 loguru==0.7.3)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

prepare() {
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")" && touch "$exclude"
    grep -qxF '/.whl/' "$exclude" || echo '/.whl/' >> "$exclude"
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$tmp" triton==3.7.1
    (cd "$tmp" && unzip -q triton-3.7.1-*.whl && rm triton-3.7.1-*.whl &&
     strip --strip-unneeded triton/_C/libtriton.so &&
     rm -rf triton/backends/nvidia/lib/cupti triton/_C/libproton.so triton/backends/amd \
            triton/backends/nvidia/bin/ptxas-blackwell &&
     tar -cf - triton triton-3.7.1.dist-info | xz -9 -T0 > "$OLDPWD/.whl/triton-3.7.1-slim.tar.xz")
    rm -rf "$tmp"
    du -sh .whl
    echo "carry [\".whl\"] with each device run (it and the working tree must stay under 64 MiB)"
}

on_device() {
    # the carried wheels and Triton 3.7.1 into /tmp/site (ahead of the image's packages), nlc editable
    [ -d .whl ] || { echo "no .whl/: run 'bash benchmarks/gpu_session.sh prepare' here and carry .whl" >&2; exit 2; }
    : "${OUT:?OUT: the folder the device tool returns}"
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    tar -xJf .whl/triton-3.7.1-slim.tar.xz -C /tmp/site
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
                torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv >> "$OUT/versions.txt"
}

case $stage in
    prepare) prepare ;;
    tests)
        on_device
        set -o pipefail
        timeout 540 python3 -m pytest -q -n 16 -p no:cacheprovider --junitxml="$OUT/triton_junit.xml" \
            "${@:-tests/triton}" 2>&1 | tee "$OUT/triton_tests.log" | tail -60 ;;
    rerun)
        on_device
        set -o pipefail
        timeout 540 python3 -m pytest -q -n 16 -p no:cacheprovider --junitxml="$OUT/rerun_junit.xml" \
            tests/triton/test_chunk_frozen_mlp_kernels.py -k "mlp2-l1- or mlp2-l2- or mlp2-lp3- or mlp2-robust-" \
            2>&1 | tee "$OUT/rerun.log" | tail -60 ;;
    bench)
        on_device
        set -o pipefail
        timeout 540 python3 benchmarks/gpu_kernels.py --json "$OUT/gpu_kernels.json" "$@" \
            2>&1 | tee "$OUT/gpu_kernels.log" ;;
    *) echo "unknown stage '$stage': prepare, tests, rerun or bench" >&2; exit 2 ;;
esac
