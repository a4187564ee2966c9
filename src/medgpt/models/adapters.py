"""LoRA / QLoRA adapters and layer freezing: attach, continue from an existing adapter, count what trains."""

from __future__ import annotations

import logging
import re

from medgpt.arguments import AdapterArguments

logger = logging.getLogger(__name__)


def split_names(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def lora_config(args: AdapterArguments, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    # "all-linear" in peft = every linear layer except the output head, which is what `all` promises.
    targets = "all-linear" if args.target_modules.strip().lower() == "all" else split_names(args.target_modules)
    save = list(dict.fromkeys([*split_names(args.modules_to_save), *(modules_to_save or [])])) or None
    return LoraConfig(
        task_type=task_type,
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=save,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
    )


def attach_adapter(model, args: AdapterArguments, task_type: str = "CAUSAL_LM",
                   modules_to_save: list[str] | None = None, gradient_checkpointing: bool = False):
    """Wrap `model` for training: a new LoRA adapter, or the one at `peft_path` made trainable again."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Casts norms to fp32 and enables input grads so LoRA on a frozen quantised base trains stably.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if args.peft_path:
        logger.info("continuing from the adapter at %s", args.peft_path)
        return PeftModel.from_pretrained(model, args.peft_path, is_trainable=True)
    return get_peft_model(model, lora_config(args, task_type, modules_to_save))


def freeze_layers(model, train_top: int) -> None:
    """Full training of only the top `train_top` decoder layers, the final norm and the output head."""
    layers = _decoder_layer_count(model)
    if train_top > layers:
        raise ValueError(f"freeze_trainable_layers={train_top} but the model has only {layers} layers")
    first = layers - train_top
    pattern = re.compile(r"\.layers\.(\d+)\.")
    for name, param in model.named_parameters():
        match = pattern.search(name)
        if match:
            param.requires_grad = int(match.group(1)) >= first
        else:
            # Outside the layer stack: embeddings stay frozen; the final norm and the head train.
            param.requires_grad = not ("embed_tokens" in name or "wte" in name or "wpe" in name)
    logger.info("training the top %d of %d layers", train_top, layers)


def _decoder_layer_count(model) -> int:
    count = getattr(model.config, "num_hidden_layers", None)
    if count is None:
        raise ValueError("cannot tell how many layers the model has (config.num_hidden_layers is missing)")
    return count


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count by their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
