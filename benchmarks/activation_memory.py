"""What one training forward keeps for the backward pass: stock modules vs lean activations (`medgpt.models.lean`).

The model is prepared as the `sft` stage prepares it (`prepare_model`: LoRA r=8 on all linear layers, chunked loss,
lean activations; SDPA once per packed document); the stock side is measured with the lean hooks standing aside,
as they do under any outer saved-tensor hook. One packed row of `--documents` documents of `--length` tokens each goes through the forward.
The kept bytes are the distinct storages autograd holds, weights excluded (the lean recipes count only the
tensors they keep). The same loss is checked on both sides.

    .venv/bin/python benchmarks/activation_memory.py                      # embedded model, 4 x 256 tokens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def kept_bytes(model, batch, lean_on: bool) -> tuple[int, float]:
    import torch

    from medgpt.models import lean

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def lean_pack(recompute, tensor):
        packed = original(recompute, tensor)
        return pack(packed) if isinstance(packed, torch.Tensor) else packed

    original = lean.Recompute._pack
    # The counting hook is an outer hook: the lean hooks stand aside for it (stock), unless told it is not there.
    with mock.patch.object(lean, "_outer_hooks_active", lambda: not lean_on), \
            mock.patch.object(lean.Recompute, "_pack", lean_pack), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    return sum(kept.values()), float(loss)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args(argv)

    import torch

    from medgpt.config import build_config
    from medgpt.arguments import CausalLMArguments
    from medgpt.models.load import load_tokenizer
    from medgpt.stages import get_stage
    from medgpt.training.recipe import prepare_model, use_packed_attention

    options = {"model_name_or_path": args.model, "torch_dtype": "fp32", "bf16": False, "output_dir": "/tmp/unused",
               "lora_rank": 8, "lora_dropout": 0.0, "target_modules": "all", "train_file_dir": str(ROOT / "data" / "demo" / "sft")}
    config = build_config(get_stage("sft"), options)
    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(0)
    tokens = args.documents * args.length
    ids = torch.randint(100, 1000, (1, tokens))
    batch = {"input_ids": ids, "labels": ids,
             "position_ids": torch.arange(args.length).repeat(args.documents).unsqueeze(0)}
    model = prepare_model(config, tokenizer, args.length, config.extra(CausalLMArguments).loss_chunk_size)
    use_packed_attention(model)
    model.train()
    results = {side: kept_bytes(model, batch, lean_on=side == "lean") for side in ("stock", "lean")}
    (stock, stock_loss), (lean, lean_loss) = results["stock"], results["lean"]
    if stock_loss != lean_loss:
        raise SystemExit(f"the losses differ: {stock_loss} vs {lean_loss}")
    print(f"{args.model}, one packed row of {args.documents} x {args.length} tokens, LoRA r=8 all linear, fp32")
    print(f"stock: {stock / 1e9:.3f} GB kept for the backward ({stock / tokens / 1e3:.1f} KB per token)")
    print(f"lean:  {lean / 1e9:.3f} GB kept for the backward ({lean / tokens / 1e3:.1f} KB per token)")
    print(f"lean_over_stock={lean / stock:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
