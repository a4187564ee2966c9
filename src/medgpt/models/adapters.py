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
    """Full training of only the top `train_top` decoder layers, the final norm and the output head.

    The head is trained even when it is tied to the input embeddings (then both train: they are one tensor).
    `train_top` 0 means the option is off: everything stays trainable.
    """
    if train_top <= 0:
        return
    prefix, layers = _decoder_layers(model)
    if train_top > layers:
        raise ValueError(f"freeze_trainable_layers={train_top} but the model has only {layers} layers")
    first = layers - train_top
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    embeddings = model.get_input_embeddings()
    embedding_ids = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    for name, param in model.named_parameters():
        match = pattern.match(name)
        if match:
            param.requires_grad = int(match.group(1)) >= first
        else:  # outside the layer stack: embeddings (token and position) freeze, final norm trains
            param.requires_grad = id(param) not in embedding_ids and "wpe" not in name
    head = model.get_output_embeddings()
    if head is not None:
        head.weight.requires_grad = True
    logger.info("training the top %d of %d layers", train_top, layers)


def _decoder_layers(model) -> tuple[str, int]:
    """The name and length of the module list holding the decoder blocks (layers, h, blocks …)."""
    import torch.nn as nn

    count = getattr(model.config, "num_hidden_layers", None)
    candidates = [(name, len(m)) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (count is None or len(m) == count)]
    if not candidates:
        raise ValueError("cannot find the model's stack of decoder layers to freeze")
    return max(candidates, key=lambda c: c[1])


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count by their logical size, DeepSpeed ZeRO-3
    partitions (shape [0] on every process) by the full size they stand for (`ds_numel`)."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", None) or param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def start_from_adapter(config) -> str | None:
    """`model_name_or_path` naming a LoRA adapter directory (an SFT output) -> its base + `peft_path`.

    Preference stages then keep training that adapter, with a frozen copy of it as the reference model: the
    reference is the SFT policy (disabling the adapter would give the pre-SFT base), and the result stays an
    adapter of the original base, which `medgpt merge` and the engine load as usual.
    """
    import json
    from pathlib import Path

    from medgpt.config import ConfigError

    m, a = config.model, config.adapter
    path = Path(m.model_name_or_path).expanduser()
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        if a.peft_path:
            raise ConfigError(f"{path} is an adapter and peft_path is set too: give the adapter once")
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path}/adapter_config.json names no base model: set model_name_or_path to the base "
                              f"and peft_path: {path}")
        logger.info("%s is a LoRA adapter: training it further on its base %s", path, base)
        m.model_name_or_path, a.peft_path = base, str(path)
        if m.tokenizer_name_or_path is None and (path / "tokenizer_config.json").is_file():
            m.tokenizer_name_or_path = str(path)  # the tokenizer (and chat template) the adapter was trained with
    if a.peft_path and not a.use_peft:
        raise ConfigError(f"full training from an unmerged adapter ({a.peft_path}): merge it first "
                          f"(`medgpt merge {a.peft_path} OUT`) and set model_name_or_path: OUT, or train LoRA")
    return a.peft_path
