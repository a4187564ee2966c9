"""The final weights on disk: gathered to full tensors wherever the engine sharded them, and checked before a run
is marked complete (a directory with train_results.json but no loadable weights is the worst outcome of a run)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SINGLE_FILES = ("model.safetensors", "adapter_model.safetensors")
INDEX_FILE = "model.safetensors.index.json"


def is_sharded(trainer) -> bool:
    """True when no process holds the whole model, so forward passes (generation) need every process."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(getattr(trainer, "is_fsdp_enabled", False)) or (
        bool(getattr(trainer, "is_deepspeed_enabled", False)) and is_deepspeed_zero3_enabled())


def save_full_weights(trainer, directory: Path) -> None:
    """Every process calls this; rank 0 writes `save_pretrained` output with full safetensors weights.

    `Trainer.save_model` under FSDP writes weights only for `FULL_STATE_DICT` (transformers 5.24 skips the save
    for `SHARDED_STATE_DICT`, the recommended type for checkpoints, without a word). The final model must load
    anywhere, so under FSDP the full state dict is gathered here whatever the type (accelerate's
    `get_state_dict`: `get_model_state_dict(full_state_dict=True, cpu_offload=True)` for FSDP2, a collective),
    and rank 0 writes it. DeepSpeed ZeRO-3 gathers 16-bit weights in `save_model` itself
    (`stage3_gather_16bit_weights_on_model_save`, checked before training by `check_deepspeed_config`).
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            trainer._save(str(directory), state_dict=without_tied_copies(state_dict, model))
    else:
        trainer.save_model(str(directory))


def without_tied_copies(state_dict: dict, model) -> dict:
    """Drop the tied weights' second names (`lm_head.weight` of a model with tied embeddings): a gathered state
    dict holds separate copies, which `save_pretrained` cannot recognise as one tensor (it compares storages), so
    the file would carry the embedding twice. A copy that differs from its source is kept (it is not tied)."""
    import torch

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    dropped = {target for target, source in tied.items()
               if target in state_dict and source in state_dict
               and torch.equal(state_dict[target], state_dict[source])}
    return {name: tensor for name, tensor in state_dict.items() if name not in dropped}


def check_weights_saved(directory: Path) -> list[str]:
    """The weight files in `directory` (safetensors, every tensor non-empty); raise if there are none.

    A tensor with no elements is a ZeRO-3 partition or an FSDP shard placeholder saved instead of the weight.
    """
    from safetensors import safe_open

    files = [name for name in SINGLE_FILES if (directory / name).is_file()]
    index = directory / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise RuntimeError(f"{index} lists weight files that were not written: {', '.join(missing)}")
        files += shards
    if not files:
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise RuntimeError(
            f"no weights were written to {directory} (it holds {present}): the run is not marked complete. Under "
            "DeepSpeed ZeRO-3 set stage3_gather_16bit_weights_on_model_save: true; the last complete checkpoint-N "
            "still holds the training state (resume_from_checkpoint: auto)")
    tensors = 0
    for name in files:
        with safe_open(str(directory / name), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                if 0 in shape:
                    raise RuntimeError(f"{directory / name}: tensor {key} has shape {list(shape)}, a shard or "
                                       "partition instead of the full weight: the gather at save failed")
                tensors += 1
    if not tensors:
        raise RuntimeError(f"{directory}: the weight files hold no tensors: the run is not marked complete")
    logger.info("final weights: %d tensors in %s", tensors, ", ".join(files))
    return files


def check_deepspeed_config(args) -> None:
    """Refuse, before training, a ZeRO-3 config whose final save would write no loadable weights."""
    config = None
    if getattr(args, "hf_deepspeed_config", None) is not None:
        config = args.hf_deepspeed_config.config
    elif getattr(args, "deepspeed_plugin", None) is not None:
        config = args.deepspeed_plugin.deepspeed_config
    zero = (config or {}).get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        from medgpt.config import ConfigError

        raise ConfigError("DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: true saves no loadable "
                          "final weights (only partitions for zero_to_fp32.py): set it to true in the DeepSpeed config")
