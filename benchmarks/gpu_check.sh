#!/usr/bin/env bash
# GPU proof (under 8 minutes): bf16 LoRA with padding-free packing (SDPA; flash-attention varlen when
# installed), QLoRA on CUDA, tokens/s and MFU on a 0.5B-class model built from a config (nothing downloaded).
# Run from the repository root on a GPU machine with torch (CUDA), transformers, peft and bitsandbytes:
#   bash benchmarks/gpu_check.sh
# Record the printed JSON lines in benchmarks/README.md with the date and the card.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
timeout 470 python benchmarks/gpu_check.py --steps 12 --warmup 2
