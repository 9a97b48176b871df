#!/usr/bin/env bash
# The one command of the megatron GPU check (issue #21 item 7); bench/megatron_gpu.py says what it measures.
#
#   bash bench/megatron_gpu.sh prepare   # HERE, before the device call: the wheels the GPU image lacks -> .whl/
#   bash bench/megatron_gpu.sh [ARGS]    # ON THE GPU MACHINE (device tool, carry [".whl"]): results under $OUT
#
# The GPU image has torch but not megatron-core, webdataset, braceexpand, omegaconf (nor Transformer
# Engine: it is not pip-installable offline; its absence makes the fp8 runs and the TE parity report
# "skipped: TE missing"). Nothing is fetched there (no network): the carried wheels are installed with
# --no-index, and omni itself is put on PYTHONPATH from this checkout (its package-dir mapping as links).
# ARGS go to bench/megatron_gpu.py (e.g. --steps 100). Then the gpu-marked tests run (tests/gpu).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS=(megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0)

if [[ "${1:-}" == "prepare" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    PY="${PYTHON:-.venv/bin/python}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    ls -la .whl
    exit 0
fi

: "${OUT:?OUT is unset: run this through the device tool (results go under \$OUT)}"
exec > >(tee "$OUT/bench.log") 2>&1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
echo "command: bash bench/megatron_gpu.sh $*"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'

SITE=/tmp/megatron_gpu_site
rm -rf "$SITE" && mkdir -p "$SITE/omni"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
else
    echo "no .whl/ carried: relying on what the image has (run 'bash bench/megatron_gpu.sh prepare' here and carry .whl)"
fi
# omni from this checkout: pyproject's package-dir mapping rebuilt as links
for f in omni/*; do ln -s "$ROOT/$f" "$SITE/omni/"; done
for d in tokenizers decoders parallel eval recipes; do ln -s "$ROOT/$d" "$SITE/omni/$d"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import omni, megatron.core, webdataset; print("omni from", omni.__file__, "| megatron-core", megatron.core.__version__)'

status=0
"$PY" bench/megatron_gpu.py --out "$OUT" "$@" || status=$?
echo "bench exit $status"
# the gpu-marked tests (tests/gpu); their log comes back as pytest.log
timeout 240 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" || status=$?
echo "exit $status"
exit "$status"
