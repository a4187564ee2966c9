"""Merge a LoRA adapter into its base model and save plain safetensors weights, tokenizer, template and card.

A QLoRA adapter learned its update on top of the *quantised* base weights. Folded into the original 16/32-bit
weights it computes something else (the quantisation error, ~0.1 of the logits on a tiny model); so, by
default, such an adapter (its run_config.yaml says load_in_4bit / load_in_8bit) is merged into the base loaded
the way it trained — quantised with the same settings — then dequantised to 16/32-bit weights. The merged
model then computes what the adapter model computed during training, to float rounding.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import yaml

from medgpt.arguments import ModelArguments
from medgpt.data.templates import TEMPLATE_FILE
from medgpt.models.load import DTYPES, load_model, load_tokenizer, resolve_model_path
from medgpt.outputs import atomic_directory, write_model_card
from medgpt.serve.engine import save_template_name, saved_template_name

logger = logging.getLogger(__name__)

HEADS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "sequence_classification"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


DEQUANTIZE = ("auto", "on", "off")


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, dtype: str = "auto", base: str | None = None,
                  trust_remote_code: bool = False, dequantize: str = "auto") -> Path:
    """Load the base under the adapter, fold the LoRA weights in, and save a plain model to `output_dir`.

    `dtype`: auto keeps the load dtype (`resolve_dtype`: fp32 on CPU); bf16 | fp16 | fp32 cast before saving.
    `base` overrides the adapter's `base_model_name_or_path`. `dequantize`: auto merges a QLoRA / 8-bit adapter
    into its base quantised as in training and dequantised (see the module docstring), on forces that (4-bit NF4
    for an adapter whose run says nothing), off merges into the base's original weights. The output appears
    atomically, never half-written.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    adapter = read_adapter_config(adapter_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not empty: merge into a new directory")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    if dequantize not in DEQUANTIZE:
        raise ValueError(f"dequantize '{dequantize}' is not one of {', '.join(DEQUANTIZE)}")
    head = HEADS.get(adapter.get("task_type") or "CAUSAL_LM")
    if head is None:
        raise ValueError(f"{adapter_dir}: task_type {adapter['task_type']!r} cannot be merged "
                         f"(supported: {', '.join(HEADS)})")
    base_name = base or adapter.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model: pass --base")
    base_path = resolve_model_path(base_name)
    if base_name.startswith((".", "/", "~")) and not Path(base_path).exists():
        raise FileNotFoundError(f"the base model {base_name} of {adapter_dir} does not exist: pass --base")

    # The adapter directory's tokenizer carries any tokens added during training; the base's otherwise.
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(adapter_dir) if has_tokenizer else base_name,
                                              trust_remote_code=trust_remote_code))
    run = _run_config(adapter_dir)
    bits = quantised_bits(run, dequantize)
    model = load_base(base_name, tokenizer, head, trust_remote_code, bits, run)
    match_trained_vocabulary(model, tokenizer, adapter_dir)

    from peft import PeftModel

    logger.info("merging %s into %s", adapter_dir, base_path)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload(safe_merge=True)
    if dtype != "auto":
        model = model.to(DTYPES[dtype])
    template_file = adapter_dir / TEMPLATE_FILE
    if template_file.is_file():  # the template training rendered with, so chat/serve render the same
        tokenizer.chat_template = template_file.read_text(encoding="utf-8")

    template = saved_template_name(adapter_dir) or run.get("template") or ""
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only (no safe_serialization flag any more)
        tokenizer.save_pretrained(tmp)
        if template_file.is_file():
            shutil.copyfile(template_file, tmp / TEMPLATE_FILE)
        save_template_name(tmp, saved_template_name(adapter_dir))
        data = [str(run[key]) for key in ("dataset_name", "train_file_dir") if run.get(key)]
        write_model_card(tmp, title=output_dir.name, base_model=base_name, stages=[run.get("stage") or "merge"],
                         data=data, method=f"LoRA merged into the {bits}-bit base, dequantised" if bits else
                         "LoRA merged", template=template)
    logger.info("merged model saved to %s", output_dir)
    return output_dir


def quantised_bits(run: dict, dequantize: str) -> int | None:
    """4 or 8 when the adapter is to be merged into a quantised-then-dequantised base, else None."""
    if dequantize == "off":
        return None
    trained = 8 if run.get("load_in_8bit") else 4 if run.get("load_in_4bit") or run.get("qlora") else None
    if dequantize == "on":
        return trained or 4
    return trained


def load_base(name: str, tokenizer, head: str, trust_remote_code: bool, bits: int | None, run: dict):
    """The base model; with `bits`, quantised as the adapter's run loaded it and then dequantised to plain weights
    in the run's dtype (before any forward: bitsandbytes repacks CPU weights at the first inference step)."""
    if bits is None:
        return load_model(ModelArguments(model_name_or_path=name, trust_remote_code=trust_remote_code), tokenizer,
                          head=head)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"this adapter was trained on a {bits}-bit base: merging it into the weights it learned on "
                         "needs bitsandbytes (pip install 'medgpt[quant]'); or pass --dequantize off to merge into the "
                         "base's original weights (its outputs then differ by the quantisation error)")
    args = ModelArguments(model_name_or_path=name, trust_remote_code=trust_remote_code,
                          torch_dtype=run.get("torch_dtype") or "auto", load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    logger.info("the adapter trained on a %d-bit base: merging into that base, dequantised to %s", bits,
                args.torch_dtype)
    return load_model(args, tokenizer, head=head).dequantize()


def input_embeddings(model):
    """The input embedding module, or None for models that do not expose it (ChatGLM-style `NotImplementedError`)."""
    try:
        return model.get_input_embeddings()
    except NotImplementedError:
        return None


def expose_input_embeddings(model) -> None:
    """Give a model whose `get_input_embeddings` raises NotImplementedError (ChatGLM-style remote code: MedicalGPT's
    merge crash) one that answers, on this instance: peft asks for the embeddings while loading an adapter. The
    embedding is the model's `nn.Embedding` with a row per vocabulary entry."""
    if input_embeddings(model) is not None:
        return
    import torch

    vocabulary = getattr(model.config, "padded_vocab_size", None) or getattr(model.config, "vocab_size", None)
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)
             and (vocabulary is None or module.num_embeddings >= vocabulary)]
    if not found:
        raise ValueError(f"{type(model).__name__} does not expose its input embeddings (get_input_embeddings raises "
                         "NotImplementedError) and has no embedding of its vocabulary's size: cannot merge into it")
    name, module = found[0]
    logger.warning("%s.get_input_embeddings is not implemented: using its embedding %s", type(model).__name__, name)
    model.get_input_embeddings = lambda: module


def read_adapter_config(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json); "
                         "a full model needs no merging")
    return json.loads(path.read_text(encoding="utf-8"))


def match_trained_vocabulary(model, tokenizer, adapter_dir: Path) -> None:
    """Resize the base's embeddings to the vocabulary the adapter was trained with, and only if it changed.

    Must happen before the adapter is loaded: peft wraps the embeddings, and resizing a wrapped model fails
    (`set_input_embeddings` NotImplementedError, MedicalGPT's merge crash). The trained size is read from the
    saved embedding weights (exact, even when training padded the matrix to a multiple), else the tokenizer.
    """
    expose_input_embeddings(model)
    rows = model.get_input_embeddings().weight.shape[0]
    saved = _saved_embedding_rows(model, adapter_dir)
    target = saved or (len(tokenizer) if len(tokenizer) > rows else rows)
    if target == rows:
        return
    if saved is None:
        logger.warning("the tokenizer has %d tokens but the base only %d embeddings and the adapter saved none: "
                       "the new tokens get fresh embeddings, not trained ones (train with "
                       "modules_to_save: embed_tokens,lm_head)", len(tokenizer), rows)
    logger.info("resizing the base embeddings %d -> %d to match the adapter's vocabulary", rows, target)
    try:
        model.resize_token_embeddings(target, mean_resizing=saved is None)  # saved rows overwrite new ones anyway
    except NotImplementedError as err:
        raise ValueError(f"{type(model).__name__} cannot resize its embeddings to the adapter's {target} rows "
                         "(set_input_embeddings is not implemented): merge with a model class that implements it") from err


def _saved_embedding_rows(model, adapter_dir: Path) -> int | None:
    """Rows of the full embedding / output-head matrices stored in the adapter, if it stores them."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        return None
    from safetensors import safe_open

    names = {name for name, module in model.named_modules()
             if module is model.get_input_embeddings() or module is model.get_output_embeddings()}
    with safe_open(str(path), framework="pt") as weights:
        for key in weights.keys():
            if "lora_" in key or not key.endswith(".weight"):
                continue
            if any(f"{name}." in key for name in names):
                return weights.get_slice(key).get_shape()[0]
    return None


def _run_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "run_config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
