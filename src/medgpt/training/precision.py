"""Master weights for full-parameter training: the weights the optimizer updates stay in fp32, whatever dtype the
model was loaded in, unless the user asked for 16-bit weights in so many words.

AdamW's step is about `learning_rate` per weight; bf16 keeps 8 bits of mantissa, so a weight of magnitude 0.02
moves only in steps of ~1.2e-4 and an update of 1e-5 is rounded away entirely: pure-bf16 full training silently
trains less than it reports. Mixed precision (`bf16: true`) computes in bf16 under autocast and needs no 16-bit
storage. fp16 with loss scaling (`fp16: true`) cannot run at all on fp16 trainable weights: the GradScaler
refuses to unscale fp16 gradients. LoRA is unaffected: peft keeps its adapter weights in fp32 already, and a
frozen base may be stored in 16 bits (nothing updates it).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)


def explicit_half_dtype(config) -> str | None:
    """`bf16` or `fp16` when the user set torch_dtype to it; None for `auto` or unset."""
    from medgpt.arguments import DTYPE_ALIASES

    given = config.given.get("torch_dtype")
    name = DTYPE_ALIASES.get(given, given) if isinstance(given, str) else None
    return name if name in ("bf16", "fp16") else None


def upcast_to_fp32(model, trainable_only: bool = True) -> int:
    """16-bit floating-point parameters (the trainable ones, or all) -> fp32, in place. Returns how many."""
    count = 0
    for param in model.parameters():
        if (param.requires_grad or not trainable_only) and param.dtype in HALF:
            param.data = param.data.float()
            count += 1
    return count


def keep_fp32_master_weights(trainer, config) -> None:
    """Before training: fp32 trainable weights for full-parameter training (see the module docstring).

    DeepSpeed keeps fp32 master copies in its optimizer and accelerate's FSDP2 upcasts trainable weights itself,
    so only single-process and DDP runs need it here. An explicit `torch_dtype: bf16` is honoured with a warning;
    an explicit fp16 with `fp16: true` is upcast anyway, since loss scaling cannot work without it.
    """
    if config.adapter.use_peft or getattr(trainer, "is_deepspeed_enabled", False) or \
            getattr(trainer, "is_fsdp_enabled", False):
        return
    model = trainer.model
    half = {p.dtype for p in model.parameters() if p.requires_grad and p.dtype in HALF}
    if not half:
        return
    explicit, args = explicit_half_dtype(config), trainer.args
    if explicit == "bf16" and not args.fp16:
        if trainer.is_world_process_zero():
            logger.warning("pure bf16 full training (torch_dtype: bf16): weights and optimizer updates are stored in "
                           "bf16, so updates smaller than ~1/256 of a weight are rounded away; torch_dtype: fp32 "
                           "with bf16: true keeps fp32 master weights at twice the weight memory")
        return
    autocast = getattr(args, "mixed_precision", "no") != "no" or args.bf16 or args.fp16
    # Without autocast a frozen 16-bit layer would feed 16-bit activations into fp32 weights: upcast all then.
    count = upcast_to_fp32(model, trainable_only=autocast)
    if trainer.is_world_process_zero():
        reason = "fp16 loss scaling unscales fp32 gradients only" if args.fp16 else \
            "small updates would round away in 16 bits"
        logger.info("full training: %d tensors upcast to fp32 master weights (%s); compute in %s", count, reason,
                    "fp16 under autocast" if args.fp16 else "bf16 under autocast" if autocast else "fp32")
