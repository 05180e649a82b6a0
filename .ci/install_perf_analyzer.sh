#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer into its own virtual environment (.venv-perf) and
# print the path of a wrapper that runs it: .venv-perf/bin/pa.
#
# Why this way: the PyPI package `perf-analyzer` is an empty placeholder. The binary
# ships inside the manylinux `tritonclient` wheels up to 2.51.0 (installed as
# <venv>/bin/perf_analyzer); later wheels are pure Python. Those pin numpy<2, so they get
# a venv of their own instead of the project's. The binary links against libcudart
# (from the `nvidia-cuda-runtime-cu12` wheel, found through LD_LIBRARY_PATH set by the
# wrapper) and Debian's libb64 (apt: libb64-0d). No GPU is needed to drive an HTTP
# server. Idempotent: re-running it reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${PERF_VENV:-.venv-perf}"
TRITONCLIENT_VERSION="2.51.0"
CUDA_RUNTIME_VERSION="12.9.79"

if ! dpkg -s libb64-0d >/dev/null 2>&1; then
    echo "installing libb64-0d (apt)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q \
    "tritonclient[http]==${TRITONCLIENT_VERSION}" \
    "nvidia-cuda-runtime-cu12==${CUDA_RUNTIME_VERSION}" >&2

if [ ! -x "$VENV/bin/perf_analyzer" ]; then
    echo "error: $VENV/bin/perf_analyzer is missing after installing tritonclient==${TRITONCLIENT_VERSION}" >&2
    exit 1
fi

cudart_dir="$("$VENV/bin/python" - <<'EOF'
import pathlib
import nvidia.cuda_runtime as m

print(pathlib.Path(list(m.__path__)[0]) / "lib")
EOF
)"
if ! ls "$cudart_dir"/libcudart.so.* >/dev/null 2>&1; then
    echo "error: no libcudart in $cudart_dir" >&2
    exit 1
fi

abs_venv="$(cd "$VENV" && pwd)"
cat >"$VENV/bin/pa" <<EOF
#!/bin/sh
# perf_analyzer with the CUDA runtime from the nvidia-cuda-runtime-cu12 wheel on its path.
LD_LIBRARY_PATH="${cudart_dir}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "${abs_venv}/bin/perf_analyzer" "\$@"
EOF
chmod +x "$VENV/bin/pa"

# Prove it runs (loader errors show here, not in the first test).
if ! "$VENV/bin/pa" --version >/dev/null 2>&1 && ! "$VENV/bin/pa" --help >/dev/null 2>&1; then
    echo "error: $VENV/bin/pa does not run:" >&2
    "$VENV/bin/pa" --help >&2 || true
    exit 1
fi
echo "$abs_venv/bin/pa"
