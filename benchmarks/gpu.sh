#!/usr/bin/env bash
# One call on a CUDA machine measures the GPU paths (issue 14): the tutorial recipe and finetune, ResNet-18,
# 25 epochs on ants/bees, finetune with its defaults (AMP, channels_last, decoded-image cache) and with each lever
# off, and with torch.compile; bare CUDA start-up too. Writes benchmarks/results-gpu.json (a few minutes).
#
#   bash benchmarks/gpu.sh [DATA] [WEIGHTS]     # DATA defaults to ../shared/data/hymenoptera_data, else sample_data
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/hymenoptera_data}
[ -d "$DATA" ] || DATA=sample_data
WEIGHTS=${2:-none}
if ! python -c "import finetune" 2>/dev/null; then
  python -m pip install -q torch==2.14.1 torchvision==0.29.1 && python -m pip install -q -e .
fi
nvidia-smi -L || true
python benchmarks/gpu_bench.py --data "$DATA" --weights "$WEIGHTS" --out benchmarks/results-gpu.json
