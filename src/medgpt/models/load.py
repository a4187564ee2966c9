"""The one model loader: name or path or embedded alias -> tokenizer and model, with dtype, attention,
quantisation, RoPE scaling and pad-token handling decided in one place."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from medgpt.arguments import DTYPE_ALIASES, ModelArguments
from medgpt.config import ConfigError
from medgpt.models.embedded import is_embedded_alias, resolve_embedded

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_model_path(name: str) -> str:
    """Embedded aliases become their cached safetensors directory; anything else is passed on as is."""
    if is_embedded_alias(name):
        return str(resolve_embedded(name))
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


# What the weights are for decides how `torch_dtype: auto` stores them on a CPU (on a GPU: bf16, else fp16):
# - "train": weights that train (full-parameter training: fp32 master weights; bf16 compute comes from autocast),
#   and anything that must stay exact (merging): fp32;
# - "frozen": the frozen base under a LoRA / QLoRA adapter while the run computes in bf16: bf16, so no weight is
#   cast each step and the base takes half the memory (adapters and optimizer state stay fp32, see
#   `keep_trainable_fp32`);
# - "inference": generation and scoring (chat, serve, eval, reward models in RL): bf16 where the CPU has bf16
#   matrix units (`medgpt.hardware.cpu_bf16`), fp32 elsewhere.
PURPOSES = ("train", "frozen", "inference")


def resolve_dtype(name: str | None, purpose: str = "train") -> torch.dtype:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs; on CPU by `purpose` (see PURPOSES)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose '{purpose}' is not one of {', '.join(PURPOSES)}")
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        from medgpt.hardware import cpu_bf16

        if purpose == "frozen" or (purpose == "inference" and cpu_bf16() != "none"):
            return torch.bfloat16
        return torch.float32
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}' is not one of auto, bf16, fp16, fp32")
    if name == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 weights on CPU are slow and overflow easily; fp32 is the right choice here")
    return DTYPES[name]


def weights_purpose(config) -> str:
    """How a training stage stores its weights (see PURPOSES), logging the precision chosen and why."""
    from medgpt.config import precision_reason

    bf16 = bool(getattr(config.training, "bf16", False))
    reason = precision_reason(bf16, "bf16" in config.given)
    frozen = config.adapter.use_peft and bf16
    if frozen:
        logger.info("precision: bf16 compute (%s); the frozen base is stored in %s, adapters and optimizer state "
                    "in fp32", reason, "bf16" if config.model.torch_dtype in (None, "auto") else config.model.torch_dtype)
    elif bf16:
        logger.info("precision: bf16 compute (%s) over fp32 master weights", reason)
    else:
        logger.info("precision: fp32 (%s)", reason)
    return "frozen" if frozen else "train"


def keep_trainable_fp32(model) -> int:
    """Cast every trainable 16-bit parameter to fp32 (a head or embedding peft copied from a bf16 base as a
    module to save): updates smaller than bf16's resolution would be lost, and the optimizer state follows the
    parameter's dtype. Quantised (4/8-bit) weights are never trainable. Returns how many were cast."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            cast += 1
    return cast


def load_model_config(args: ModelArguments):
    from transformers import AutoConfig

    path = resolve_model_path(args.model_name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir)
    if args.model_type and config.model_type != args.model_type:
        raise ConfigError(f"model_type is '{args.model_type}' but {args.model_name_or_path} is a '{config.model_type}' model")
    return config


def load_tokenizer(args: ModelArguments):
    from transformers import AutoTokenizer

    path = resolve_model_path(args.tokenizer_name_or_path or args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token, saying which; masks never compare ids with it anyway."""
    if tokenizer.pad_token is not None:
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            logger.info("pad token is the end-of-turn/EOS token %r: padding is masked by attention masks, not by id",
                        tokenizer.pad_token)
        return
    for candidate in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]"):
        if candidate in tokenizer.get_vocab():
            tokenizer.pad_token = candidate
            logger.info("pad token set to the reserved token %r", candidate)
            return
    if tokenizer.eos_token is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token; add one with new_tokens_file")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning("the tokenizer has no pad token: using EOS %r for padding (masks come from attention masks, "
                   "so EOS is still learned)", tokenizer.eos_token)


def quantization_config(args: ModelArguments, dtype: torch.dtype):
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError("4/8-bit loading needs bitsandbytes: pip install 'medgpt[quant]'") from err
    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # NF4 matches the normal distribution of weights (QLoRA paper)
        bnb_4bit_use_double_quant=True,  # quantise the quantisation constants too: ~0.4 bit/param saved
        bnb_4bit_compute_dtype=dtype,
    )


def apply_rope_scaling(config, args: ModelArguments, length: int | None) -> None:
    """Stretch RoPE so `length` tokens fit (transformers 5 keeps RoPE settings in `config.rope_parameters`)."""
    if not args.rope_scaling:
        return
    params = getattr(config, "rope_parameters", None)
    if params is None:
        raise ConfigError(f"{config.model_type} does not use RoPE parameters: rope_scaling cannot apply")
    limit = config.max_position_embeddings
    factor = args.rope_scaling_factor or (float(math.ceil(length / limit)) if length and length > limit else 2.0)
    params = dict(params)
    params.update(rope_type=args.rope_scaling, factor=factor)
    if args.rope_scaling == "yarn":
        params["original_max_position_embeddings"] = limit
    config.rope_parameters = params
    logger.info("RoPE scaling %s with factor %.2f (context %d -> %d)", args.rope_scaling, factor, limit, int(limit * factor))


def load_model(args: ModelArguments, tokenizer=None, head: str = "causal_lm", context_length: int | None = None,
               purpose: str = "train"):
    """Load the model for training or inference. `head`: causal_lm | sequence_classification (scalar reward);
    `purpose` (train | frozen | inference) decides the dtype `torch_dtype: auto` means on a CPU."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = load_model_config(args)
    apply_rope_scaling(config, args, context_length)
    dtype = resolve_dtype(args.torch_dtype, purpose)
    kwargs = dict(
        config=config,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        cache_dir=args.cache_dir,
        attn_implementation=args.attn_implementation,
    )
    quant = quantization_config(args, dtype)
    device_map = placement(args.device_map, quantised=quant is not None)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map is not None:
        kwargs["device_map"] = device_map
    path = resolve_model_path(args.model_name_or_path)
    if head == "sequence_classification":
        config.num_labels = 1
        if tokenizer is not None:
            config.pad_token_id = tokenizer.pad_token_id  # the reward head pools via attention masks; HF needs it set
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    elif head == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        raise ValueError(f"unknown head '{head}'")
    generation_config = getattr(model, "generation_config", None)  # only models that can generate have one
    if tokenizer is not None and generation_config is not None and generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    contiguous_head_input(model)
    return model


def contiguous_head_input(model) -> None:
    """Hand the LM head a contiguous input. transformers slices the last hidden state for `logits_to_keep`
    (generation's prefill and our MCQ prompts keep one position: `hidden[:, -1:, :]`, a view whose batch stride
    spans the whole sequence). torch's matmul folds a 3-D input into one matrix product only when the view
    flattens without a copy or the weight requires grad; a frozen head (inference, a LoRA base) instead gets
    broadcast to a batched product, one copy of the whole head per row. Measured by benchmarks/head_input.py on
    a 2-core CPU: a frozen SmolLM2-135M forward of 8 rows x 128 tokens keeping the last logits, in bf16, 1.64 s
    without this and 1.03 s with it (1.59x; 4 rows 1.41x; 1 row, already contiguous, the same)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def placement(device_map: str | None, quantised: bool = False):
    """The `device_map` to load with. Under torchrun / accelerate (WORLD_SIZE > 1) each process holds its own copy
    on its own device, as MedicalGPT does: `auto` or a device would put every process's model on the same GPUs, so
    it becomes this process's device (said in a log line); under FSDP or DeepSpeed ZeRO-3 the engine places the
    weights and there is none. A quantised model is always placed at load (bitsandbytes quantises on the device)."""
    import os

    from transformers.integrations import is_deepspeed_zero3_enabled

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sharded = is_deepspeed_zero3_enabled() or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        local = None if sharded and not quantised else {"": _local_device()}
        if device_map is not None and device_map != local:
            logger.info("device_map %r replaced by %s: under a distributed launch each process places its own copy%s",
                        device_map, local, " (the sharding engine places the weights)" if local is None else "")
        return local
    if quantised:
        return device_map or {"": _local_device()}
    return device_map


def _local_device():
    import os

    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", 0))
    return "cpu"
