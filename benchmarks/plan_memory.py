"""`medgpt plan`'s formulas against measured memory: one training step per case, each in a fresh process.

On CUDA the measure is `torch.cuda.max_memory_allocated` (what the formulas model; the plan's CUDA-context and
fragmentation line is left out of the comparison); on CPU it is the growth of peak RSS (VmHWM) over the RSS
after the model is ready, which includes allocator and library noise (hence the wide tolerance in
tests/test_plan.py). Both compare what a step adds to the loaded model (optimizer states, then the larger of
activations + logits and gradients: `medgpt.plan.memory.peak`); on CUDA the loaded weights are compared too.

    python benchmarks/plan_memory.py --device cuda                       # built-in shapes, random weights
    python benchmarks/plan_memory.py --device cpu --model smollm2-135m --cases lora,full --batch 2 --length 256

Prints one JSON line per case: measured and estimated GiB and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Shapes of public models (config.json values), built with random weights: the memory does not depend on them.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, attention_bias=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}
# name -> (shape, plan.Setup fields); batch and length come from the command line unless given here
CUDA_CASES = {
    "smollm2-full": ("smollm2-135m", dict(method="full")),
    "smollm2-lora": ("smollm2-135m", dict(method="lora")),
    "qwen-full": ("qwen2.5-0.5b", dict(method="full")),
    "qwen-full-gc": ("qwen2.5-0.5b", dict(method="full", gradient_checkpointing=True)),
    "qwen-full-packed": ("qwen2.5-0.5b", dict(method="full", packed=True)),
    "qwen-lora": ("qwen2.5-0.5b", dict(method="lora")),
    "qwen-lora-nodropout": ("qwen2.5-0.5b", dict(method="lora", lora_dropout=0.0)),
    "qwen-lora-gc": ("qwen2.5-0.5b", dict(method="lora", gradient_checkpointing=True)),
    "qwen-freeze": ("qwen2.5-0.5b", dict(method="freeze")),
    "qwen-dpo-lora": ("qwen2.5-0.5b", dict(method="lora", stage="dpo")),
    "tinyllama-amp": ("tinyllama-1.1b", dict(method="full", bits=32, batch=1)),
    "llama2-7b-full-gc": ("llama2-7b", dict(method="full", gradient_checkpointing=True, batch=1, max_length=1024)),
    "llama2-7b-lora": ("llama2-7b", dict(method="lora", batch=1, max_length=1024)),
    "llama2-7b-lora-gc": ("llama2-7b", dict(method="lora", gradient_checkpointing=True, batch=4, max_length=1024)),
}
# What a step adds to the loaded model: every line but these
NOT_GROWTH = ("weights", "extra models", "CUDA context, allocator", "KV cache")


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def build_model(source: str, setup, device: str):
    """Our loader for a model directory or alias; random weights for a built-in shape."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from medgpt.arguments import ModelArguments

    dtype = torch.float32 if setup.bits == 32 or device == "cpu" else torch.bfloat16
    if source in SHAPES:
        values = dict(SHAPES[source])
        config = (Qwen2Config if values.pop("attention_bias", False) else LlamaConfig)(**values)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype), config
    from medgpt.models.load import load_model, load_model_config

    args = ModelArguments(model_name_or_path=source, torch_dtype="fp32" if dtype == torch.float32 else "bf16")
    return load_model(args).to(device), load_model_config(args)


def prepare(model, setup):
    """The stage's own preparation: chunked loss, lean activations, checkpointing, LoRA or freezing."""
    from medgpt.arguments import AdapterArguments
    from medgpt.models.adapters import attach_adapter, freeze_layers
    from medgpt.models.lean import use_lean_activations
    from medgpt.plan.memory import STAGE_NEEDS
    from medgpt.training.trainer import use_chunked_loss

    if STAGE_NEEDS[setup.stage].chunked_loss:
        use_chunked_loss(model, setup.loss_chunk_size)
    if setup.lean_activations:
        use_lean_activations(model)
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if setup.adapter:
        args = AdapterArguments(lora_rank=setup.lora_rank, lora_dropout=setup.lora_dropout,
                                target_modules=setup.lora_targets)
        model = attach_adapter(model, args, gradient_checkpointing=setup.gradient_checkpointing)
    elif setup.method == "freeze":
        freeze_layers(model, setup.trainable_layers)
    return model


def step(model, optimizer, setup, device: str, packed: bool) -> None:
    """Forward + backward + AdamW step on random ids, all positions trained; pair stages run 2× the rows.
    `packed`: the rows concatenated into one, with per-row position ids (our padding-free SFT batches)."""
    import torch

    from medgpt.plan.memory import STAGE_NEEDS

    rows = setup.batch * STAGE_NEEDS[setup.stage].sequences
    ids = torch.randint(0, model.config.vocab_size, (rows, setup.max_length), device=device)
    extra = {}
    if packed:
        extra["position_ids"] = torch.arange(setup.max_length, device=device).repeat(rows).unsqueeze(0)
        ids = ids.reshape(1, -1)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=ids, labels=ids, **extra).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(source: str, fields: dict, device: str) -> dict:
    import torch

    from medgpt.plan.memory import GiB, Hardware, Setup, estimate, model_shape, peak

    fields = dict(fields)
    packed = fields.pop("packed", False)
    setup = Setup(**fields)
    torch.manual_seed(0)
    model, config = build_model(source, setup, device)
    model = prepare(model, setup)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM (peak RSS) from the current RSS
    for _ in range(2):  # the first step allocates the optimizer states; the second is the steady state
        step(model, optimizer, setup, device, packed)
    highest = torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")
    hardware = Hardware(device, 80.0, True, cuda=device == "cuda")
    plan = estimate(model_shape(config), setup, hardware)
    lines = {line.label: line.bytes for line in plan.lines}
    expected = peak([line for line in plan.lines if line.label not in NOT_GROWTH])
    result = {"source": source, "device": device, **fields, "packed": packed, "trainable": plan.trainable,
              "measured_gib": round((highest - base) / GiB, 3), "estimated_gib": round(expected / GiB, 3),
              "ratio": round(expected / max(highest - base, 1), 3),
              "estimate": {label: round(value / GiB, 3) for label, value in lines.items()}}
    if device == "cuda":
        result.update(weights_measured_gib=round(base / GiB, 3), weights_estimated_gib=round(lines["weights"] / GiB, 3),
                      reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 3))
        free, total = torch.cuda.mem_get_info()
        result["outside_allocator_gib"] = round((total - free - torch.cuda.memory_reserved()) / GiB, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", help="measure this model (dir or alias) instead of the built-in shapes")
    parser.add_argument("--cases", help="comma list: CUDA case names, or with --model: lora, full, freeze")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--only", help=argparse.SUPPRESS)  # child mode: one JSON case
    args = parser.parse_args()
    if args.only:
        case = json.loads(args.only)
        print(json.dumps(measure(case["source"], case["fields"], args.device)), flush=True)
        return
    if args.model:
        cases = {name: (args.model, {"method": name}) for name in (args.cases or "lora,full").split(",")}
    else:
        cases = {name: CUDA_CASES[name] for name in (args.cases.split(",") if args.cases else CUDA_CASES)}
    for name, (source, fields) in cases.items():
        fields = {"batch": args.batch, "max_length": args.length, "bits": 16 if args.device == "cuda" else 32, **fields}
        child = subprocess.run([sys.executable, __file__, "--device", args.device, "--only",
                                json.dumps({"source": source, "fields": fields})], capture_output=True, text=True)
        if child.returncode:
            print(json.dumps({"case": name, "error": child.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        print(json.dumps({"case": name, **json.loads(child.stdout.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
