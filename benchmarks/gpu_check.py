"""GPU proof for the causal-LM path: bf16 LoRA training steps with padding-free packing (SDPA, flex
attention, and flash-attention varlen when installed) against the padded baseline, QLoRA on CUDA, useful
tokens/s and MFU, and a check that a packed document's logits equal its logits alone, on a 0.5B-class model
built from a config (random weights, nothing downloaded). `--tiny --device cpu` is the smoke mode the test
suite runs.

    python benchmarks/gpu_check.py                      # on a GPU machine (see gpu_check.sh)
    python benchmarks/gpu_check.py --tiny --device cpu  # seconds, CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from medgpt.data.collators import PaddedCollator, PaddingFreeCollator
from medgpt.models.attention import PACKED_SDPA, register_packed_attention
from medgpt.training.trainer import use_chunked_loss

# Dense bf16 peak of the cards we meet, TFLOP/s (no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def qwen_05b_config(tiny: bool) -> Qwen2Config:
    if tiny:
        return Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    # Qwen2.5-0.5B's shape
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1_000_000.0)


def make_batch(vocab: int, lengths: list[int], generator: torch.Generator, padded: bool) -> dict:
    """The same samples as one padding-free row, or padded to the longest (the baseline)."""
    features = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": ids, "position_ids": list(range(n))})
    return PaddedCollator(pad_token_id=0)(features) if padded else PaddingFreeCollator()(features)


def packed_equals_alone(config, device: str, attention: str) -> float:
    """Largest |logit difference| of the second document of a packed row vs that document alone (bf16 on GPU)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype).to(device).eval()
    model.config._attn_implementation = attention
    first, second = torch.randint(10, config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    row = torch.cat([first, second])[None].to(device)
    positions = torch.cat([torch.arange(96), torch.arange(96)])[None].to(device)
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, 96:]
        alone = model(input_ids=second[None].to(device), use_cache=False).logits[0]
    return float((packed.float() - alone.float()).abs().max())


def build(config, dtype, attention: str, device: str, quantize: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype)
    if quantize:  # QLoRA: save and reload through bitsandbytes NF4
        import tempfile

        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype,
                                                     attn_implementation=attention, device_map={"": device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.config._attn_implementation = attention
        model = model.to(device)
    use_chunked_loss(model)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def run(name: str, config, args, attention: str, quantize: bool = False, padded: bool = False) -> dict:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(config, dtype, attention, args.device, quantize)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    lengths = [64, 48, 32, 96] if args.tiny else [2048, 1536, 1024, 512, 1800, 700, 1200, 1400]
    tokens = elapsed = 0.0
    losses = []
    for step in range(args.steps):
        batch = make_batch(config.vocab_size, lengths, generator, padded)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=args.device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
            tokens += sum(lengths)  # useful tokens: padding does not count
        losses.append(float(loss.detach()))
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = tokens / elapsed
    # 6 N flops per token for forward + backward of the weights (frozen base: backward still flows through them)
    flops = 6 * params * tokens_per_s
    result = {"run": name, "tokens_per_s": round(tokens_per_s, 1), "loss_first": round(losses[0], 4),
              "loss_last": round(losses[-1], 4), "params_m": round(params / 1e6, 1), "attention": attention}
    if args.device == "cuda":
        card = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in card), None)
        result.update(gpu=card, peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      mfu=round(flops / (peak * 1e12), 3) if peak else None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script, measures nothing")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--flex", action="store_true", help="also flex attention (torch.compile: slow first step)")
    args = parser.parse_args()
    config = qwen_05b_config(args.tiny)
    register_packed_attention()
    plans = [("bf16 LoRA, padded, sdpa (baseline)", "sdpa", {"padded": True}),
             ("bf16 LoRA, packed, sdpa block-diagonal mask", "sdpa", {}),
             ("bf16 LoRA, packed, sdpa per document (ours)", PACKED_SDPA, {})]
    if args.device == "cuda" and importlib.util.find_spec("bitsandbytes"):
        plans.append(("QLoRA NF4, packed, sdpa per document", PACKED_SDPA, {"quantize": True}))
    if args.device == "cuda" and importlib.util.find_spec("flash_attn"):
        plans.append(("bf16 LoRA, packed, flash_attention_2 varlen", "flash_attention_2", {}))
    if args.device == "cuda" and args.flex:  # compiles first: minutes on a cold machine
        plans.append(("bf16 LoRA, packed, flex_attention", "flex_attention", {}))
    baseline = None
    for name, attention, options in plans:
        try:  # one failing path must not hide the others' numbers
            result = run(name, config, args, attention, **options)
        except Exception as err:  # noqa: BLE001 - reported, not swallowed
            print(json.dumps({"run": name, "error": f"{type(err).__name__}: {err}"[:500]}), flush=True)
            continue
        baseline = baseline or result["tokens_per_s"]
        result["vs_padded"] = round(result["tokens_per_s"] / baseline, 2)
        print(json.dumps(result), flush=True)
    attentions = ["sdpa", "eager", PACKED_SDPA]
    check = {a: packed_equals_alone(config, args.device, a) for a in attentions}
    print(json.dumps({"run": "packed document logits vs alone, max abs diff", **check}))


if __name__ == "__main__":
    main()
