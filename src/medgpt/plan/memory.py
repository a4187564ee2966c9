"""`medgpt plan`'s formulas: the memory a training run needs per GPU, from the model's config.json alone.
docs/memory.md derives each one and compares them with the public VRAM table; `benchmarks/plan_memory.py`
measures them on a GPU (within 2% of `torch.cuda.max_memory_allocated` on an H100).

Parameter counts come from building the model on PyTorch's meta device (shapes only, no memory), so they are
exact for any architecture transformers knows. Memory, in bytes, with b = bytes per activation (2 on a GPU,
which computes in bf16/fp16; the weights' size on a CPU) and h, h_kv, I = hidden, key/value and MLP widths:

  weights      frozen params × bytes per weight + trainable params × bytes per trainable weight
  gradients    trainable params × bytes per trainable weight
  optimizer    trainable params × AdamW's two states (+ a 4-byte fp32 master copy under DeepSpeed)
  activations  tokens × trained layers × bytes per token per layer (`layer_activation_bytes`); with gradient
               checkpointing tokens × (trained layers × b·h + one layer's set, rebuilt in the backward)
  logits       tokens (our PT/SFT loss: one chunk) × vocabulary × (2b + 8)
  peak         weights + optimizer + the largest of activations + logits, gradients, rollouts' KV cache
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from medgpt.config import ConfigError

GiB = 1024 ** 3
METHODS = ("full", "freeze", "lora", "qlora")
BITS = (32, 16, 8, 4)
ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
# optim -> bytes per trainable parameter of AdamW's two states; None: the states take the parameter's dtype
OPTIMIZERS = {"adamw_torch_fused": None, "adamw_torch": None, "adamw_8bit": 2, "adamw_bnb_8bit": 2,
              "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}
# Measured on an H100 (benchmarks/plan_memory.py): memory outside PyTorch's allocator, and reserved over allocated
CUDA_CONTEXT = 0.75 * GiB  # CUDA context and kernels, taken before training starts
ALLOCATOR_SLACK = 0.10  # cached blocks that fragmentation leaves unusable (1-16% measured), as a share of the rest


@dataclass(frozen=True)
class StageNeeds:
    """What a stage holds besides one trained model: the per-stage rows of the plan."""

    sequences: int = 1  # sequences per sample through the trained model (chosen + rejected = 2)
    reference: bool = False  # frozen copy of the starting policy; free under LoRA (the base, adapters off)
    reward_model: bool = False  # a frozen reward model: an adapter on the base under LoRA, else the policy's size
    critic: bool = False  # ours (rl/actor_critic.py): a second adapter + value head; full training adds a base
    generates: bool = False  # rollouts: a KV cache, alive before the update, not during it
    chunked_loss: bool = False  # our PT/SFT loss projects one chunk of positions at a time, not (tokens × V)
    head: str = "causal_lm"


STAGE_NEEDS = {
    "pt": StageNeeds(chunked_loss=True),
    "sft": StageNeeds(chunked_loss=True),
    "rm": StageNeeds(sequences=2, head="reward"),
    "dpo": StageNeeds(sequences=2, reference=True),
    "orpo": StageNeeds(sequences=2),
    "kto": StageNeeds(reference=True),
    "ppo": StageNeeds(sequences=2, reference=True, reward_model=True, critic=True, generates=True),
    "grpo": StageNeeds(generates=True),  # TRL's beta defaults to 0: no reference model is loaded
    "rloo": StageNeeds(reference=True, generates=True),  # beta defaults to 0.05: a reference model
}


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float
    bf16: bool
    cuda: bool = True


# ------------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Linear:
    name: str
    inputs: int
    outputs: int


@dataclass(frozen=True)
class ModelShape:
    """config.json's sizes and the parameter counts of the model they build."""

    layers: int
    hidden: int
    kv_hidden: int  # num_key_value_heads × head_dim: smaller than hidden under grouped-query attention
    intermediate: int
    vocab: int
    total: int  # parameters, tied embeddings counted once
    linears: tuple[Linear, ...]  # every Linear but the output head: what LoRA `all` adapts and 4/8-bit quantise
    layer_params: int  # one decoder layer
    top_params: int  # what freezing keeps trainable besides the top layers: final norm and output head
    head_params: int  # the output head (the embedding matrix when tied), or the reward model's score head

    @property
    def quantised(self) -> int:
        """Weights bitsandbytes stores in 4/8 bits (Linear weights; biases, norms, embeddings stay)."""
        return sum(linear.inputs * linear.outputs for linear in self.linears)


def read_model_config(name: str, trust_remote_code: bool = False):
    """config.json of a local directory (an adapter directory reads its base's), the embedded alias, or a hub
    name (needs the network). Reads no weights."""
    from transformers import AutoConfig

    from medgpt.models.load import resolve_model_path

    path = Path(resolve_model_path(name))
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not (path / "config.json").is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter} names no base model: give the base model with --model")
        return read_model_config(base, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config.json of '{name}': {err}\nGive a local model directory, the "
                          "embedded alias smollm2-135m, or a hub name while the network is reachable.") from err


def model_shape(config, head: str = "causal_lm", trust_remote_code: bool = False) -> ModelShape:
    """Build the model on the meta device and count what the formulas need."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from medgpt.models.adapters import _decoder_layers, freeze_layers

    config = copy.deepcopy(config)
    if head == "reward":
        config.num_labels = 1
    factory = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    with torch.device("meta"):
        model = factory.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    output = model.score if head == "reward" else model.get_output_embeddings()
    linears = tuple(Linear(name, m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and m is not output)
    prefix, layers = _decoder_layers(model)
    stack = model.get_submodule(prefix)
    layer_params = sum(p.numel() for p in stack[0].parameters())
    log = logging.getLogger("medgpt.models.adapters")
    level = log.level
    log.setLevel(logging.WARNING)  # its "training the top 1 of N layers" is not about the user's run
    try:
        freeze_layers(model, 1)  # the real rule: top layer + final norm + head train, the rest freezes
    finally:
        log.setLevel(level)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelShape(
        layers=layers, hidden=text.hidden_size,
        kv_hidden=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size, vocab=text.vocab_size,
        total=sum(p.numel() for p in model.parameters()), linears=linears,
        layer_params=layer_params, top_params=trainable - layer_params, head_params=output.weight.numel(),
    )


def lora_targets(shape: ModelShape, targets: str) -> list[Linear]:
    """The Linear layers LoRA adapts: `all` (peft's all-linear) or a comma list matched on the last name part."""
    if targets.strip().lower() == "all":
        return list(shape.linears)
    names = {part.strip() for part in targets.split(",") if part.strip()}
    return [linear for linear in shape.linears if linear.name.rsplit(".", 1)[-1] in names]


def lora_parameters(shape: ModelShape, rank: int, targets: str) -> int:
    """LoRA adds A (r × in) and B (out × r) to each adapted layer."""
    return sum(rank * (linear.inputs + linear.outputs) for linear in lora_targets(shape, targets))


# ------------------------------------------------------------------------------------------------ formulas


@dataclass(frozen=True)
class Setup:
    """One planned run; `batch` is the per-GPU micro-batch in samples."""

    stage: str = "sft"
    method: str = "lora"
    bits: int = 16
    batch: int = 1
    max_length: int = 1024
    gpus: int = 1
    zero: int = 0  # DeepSpeed ZeRO stage, 0 = none
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch_fused"
    lora_rank: int = 8
    lora_targets: str = "all"
    lora_dropout: float = 0.05
    trainable_layers: int = 2  # freeze: the top layers that train
    loss_chunk_size: int = 256
    lean_activations: bool = True  # our stages recompute the MLP's act(gate) and product (medgpt.models.lean)
    accumulation: int = 1  # gradient accumulation: not memory, carried so a smaller batch keeps the same step

    @property
    def adapter(self) -> bool:
        return self.method in ("lora", "qlora")


def check_setup(setup: Setup) -> None:
    if setup.stage not in STAGE_NEEDS:
        raise ConfigError(f"stage '{setup.stage}' is not one of {', '.join(STAGE_NEEDS)}")
    if setup.method not in METHODS:
        raise ConfigError(f"method '{setup.method}' is not one of {', '.join(METHODS)}")
    if setup.bits not in BITS:
        raise ConfigError(f"bits {setup.bits} is not one of {', '.join(map(str, BITS))}")
    if setup.method == "qlora" and setup.bits > 8:
        raise ConfigError("qlora trains LoRA on a 4-bit (or 8-bit) base: use --bits 4 or 8, or --method lora")
    if not setup.adapter and setup.bits < 16:
        raise ConfigError("quantised weights cannot be trained in full: use --method lora/qlora or --bits 16")
    if setup.optim not in OPTIMIZERS:
        raise ConfigError(f"optim '{setup.optim}' is not one of {', '.join(OPTIMIZERS)}")
    if min(setup.batch, setup.max_length, setup.gpus, setup.lora_rank) < 1:
        raise ConfigError("batch, max_length, gpus and lora_rank must be at least 1")


def trainable_parameters(shape: ModelShape, setup: Setup) -> int:
    needs = STAGE_NEEDS[setup.stage]
    if setup.method == "full":
        count = shape.total
    elif setup.method == "freeze":
        count = min(setup.trainable_layers, shape.layers) * shape.layer_params + shape.top_params
    else:
        count = lora_parameters(shape, setup.lora_rank, setup.lora_targets)
        if needs.head == "reward":
            count += shape.hidden  # the score head trains in full (modules_to_save)
    if needs.critic:  # the critic's adapter (same rank and targets) and its value head
        count += lora_parameters(shape, setup.lora_rank, setup.lora_targets) + shape.hidden + 1
    return count


def trainable_bytes(setup: Setup) -> int:
    """Adapters are fp32 (peft upcasts them on 16-bit bases); full training keeps the weights' own dtype."""
    return 4 if setup.adapter or setup.bits == 32 else 2


def frozen_weight_bytes(shape: ModelShape, setup: Setup) -> float:
    """Bytes of a frozen copy of the model. 4-bit NF4 with double quantisation stores 0.5 byte per weight plus
    one 8-bit scale per 64 weights and one fp32 scale per 256 of those; 8-bit stores 1 byte plus an fp32
    scale per output row. peft's k-bit preparation then keeps everything not quantised in fp32."""
    if setup.bits >= 16:
        return shape.total * setup.bits / 8
    quantised = shape.quantised
    if setup.bits == 4:
        packed = quantised * (0.5 + 1 / 64 + 4 / (64 * 256))
    else:
        packed = quantised + 4 * sum(linear.outputs for linear in shape.linears)
    return packed + 4 * (shape.total - quantised)


def activation_dtype_bytes(setup: Setup, hardware: Hardware) -> int:
    """b: GPUs compute in bf16/fp16 (autocast) whatever the weights; a CPU computes in the weights' dtype."""
    return 2 if hardware.cuda or setup.bits == 16 else 4


def layer_activation_bytes(shape: ModelShape, setup: Setup, hardware: Hardware) -> float:
    """Bytes a trained decoder layer keeps for the backward pass, per token (docs/memory.md derives it).

    A layer that passes gradients but trains nothing keeps its RMSNorm inputs in fp32 (8h), q, k, v and the
    attention output (2h + 2h_kv) and the MLP's gate, activation and up projections (3I). Training its
    weights adds the normalised inputs (2h), the two linear inputs (2h) and the down projection's input (I).
    LoRA instead keeps, per adapted layer, its own copy of that layer's input (`_adapter_copy_bytes`) and the
    r-wide LoRA activation. Lean activations rebuild the activation and the down projection's input from gate
    and up in the backward: neither is kept (a LoRA's own copy of that input still is).
    """
    h, h_kv, inter = shape.hidden, shape.kv_hidden, shape.intermediate
    b = activation_dtype_bytes(setup, hardware)
    activation = down_input = 0 if setup.lean_activations else inter  # act(gate) and the product
    passing = 8 * h + b * (2 * h + 2 * h_kv + 2 * inter + activation)
    if not setup.adapter:
        return passing + b * (4 * h + down_input)
    adapted = lora_targets(shape, setup.lora_targets)
    copy_bytes = _adapter_copy_bytes(setup, hardware, b)
    shared = b * (2 * h + down_input) * shape.layers  # the layers' own inputs, used by the adapters as they are
    inputs = sum(linear.inputs for linear in adapted) * copy_bytes if copy_bytes else shared
    return passing + (inputs + len(adapted) * setup.lora_rank * b) / shape.layers


def _adapter_copy_bytes(setup: Setup, hardware: Hardware, b: int) -> int:
    """Bytes per input element that each adapted layer keeps of its own (0: it shares the layer's input)."""
    dropout = setup.lora_dropout > 0
    if hardware.cuda:  # autocast: the 16-bit cast of the input peft upcast to the fp32 adapter; a bool mask
        return 2 + dropout
    if dropout:  # the fp32 dropout output and its mask, of the input's dtype
        return 8
    return 4 if b == 2 else 0  # the fp32 upcast of a 16-bit input; fp32 inputs are used as they are


def activation_bytes(shape: ModelShape, setup: Setup, hardware: Hardware) -> float:
    """Layers below the lowest trained one keep nothing (no gradient flows there); embeddings, the final norm
    and the residual stream add (4 + 2b)·h per token. Checkpointing keeps each layer's input (b·h) and
    rebuilds one layer's set at a time in the backward."""
    b = activation_dtype_bytes(setup, hardware)
    trained = min(setup.trainable_layers, shape.layers) if setup.method == "freeze" else shape.layers
    if setup.gradient_checkpointing:  # checkpointing's hooks decide what the rebuilt layer keeps: lean stands aside
        layer = layer_activation_bytes(shape, replace(setup, lean_activations=False), hardware)
        per_token = trained * b * shape.hidden + layer
    else:
        per_token = trained * layer_activation_bytes(shape, setup, hardware)
    return tokens(setup) * (per_token + (4 + 2 * b) * shape.hidden)


def tokens(setup: Setup) -> int:
    return setup.batch * setup.max_length * STAGE_NEEDS[setup.stage].sequences


@dataclass(frozen=True)
class Line:
    label: str
    bytes: float
    how: str
    phase: str = "static"  # static | forward | gradients | rollout (`peak` says which coexist)


@dataclass
class Estimate:
    shape: ModelShape
    setup: Setup
    hardware: Hardware
    trainable: int
    lines: list[Line]

    @property
    def total(self) -> float:
        return peak(self.lines)

    @property
    def fits(self) -> bool:
        return self.total <= self.hardware.memory_gib * GiB


PHASES = ("forward", "gradients", "rollout")


def peak(lines: list[Line]) -> float:
    """Static memory plus the largest phase: the backward frees each layer's activations as it makes that
    layer's gradients, so the peak holds activations + logits (its start) or all gradients (its end, and the
    optimizer step), not both; the rollouts' KV cache is freed before the update."""
    phase = {name: sum(line.bytes for line in lines if line.phase == name) for name in ("static", *PHASES)}
    return phase["static"] + max(phase[name] for name in PHASES)


def estimate(shape: ModelShape, setup: Setup, hardware: Hardware) -> Estimate:
    """Peak memory of one GPU (or the CPU) for `setup`, line by line."""
    check_setup(setup)
    trainable = trainable_parameters(shape, setup)
    lines = [*model_lines(shape, setup, trainable), *training_lines(shape, setup, hardware, trainable)]
    if hardware.cuda:
        lines.append(Line("CUDA context, allocator", CUDA_CONTEXT + ALLOCATOR_SLACK * peak(lines),
                          f"{CUDA_CONTEXT / GiB:.2f} GiB + {ALLOCATOR_SLACK:.0%} fragmentation"))
    return Estimate(shape, setup, hardware, trainable, lines)


def model_lines(shape: ModelShape, setup: Setup, trainable: int) -> list[Line]:
    """Weights, extra models, gradients and optimizer states, each split over the GPUs as ZeRO says."""
    needs, n, w_t = STAGE_NEEDS[setup.stage], setup.gpus, trainable_bytes(setup)
    split = {stage: (n if setup.zero >= stage else 1) for stage in (1, 2, 3)}  # ZeRO-k splits over n GPUs
    over = {stage: (f" / {n} GPUs" if split[stage] > 1 else "") for stage in (1, 2, 3)}
    if setup.adapter:
        weights = frozen_weight_bytes(shape, setup) + trainable * w_t
        how = f"{_count(shape.total)} params at {_weight_label(setup)} + {_count(trainable)} trainable at fp32"
    else:
        weights = shape.total * setup.bits / 8
        how = f"{_count(shape.total)} params at {_weight_label(setup)}"
    lines = [Line("weights", weights / split[3], how + over[3])]
    # under LoRA the reward model is a LoRA adapter of the same base (what `medgpt rm` writes), mounted on the
    # policy's base beside the actor and critic (rl/reward_adapter.py); under full training it is a model of its own
    copies = [name for name, wanted in (("reference + critic backbone" if needs.critic else "reference",
                                         needs.reference and not setup.adapter),
                                        ("reward model", needs.reward_model and not setup.adapter)) if wanted]
    if copies:  # loaded frozen in 16-bit (or the run's 4/8 bits)
        frozen = frozen_weight_bytes(shape, replace(setup, bits=min(setup.bits, 16)))
        lines.append(Line("extra models", len(copies) * frozen / split[3],
                          f"{' and '.join(copies)}: {_count(shape.total)} params{' each' if len(copies) > 1 else ''}, "
                          "frozen" + over[3]))
    elif needs.reward_model:
        mounted = lora_parameters(shape, setup.lora_rank, setup.lora_targets) + shape.hidden
        lines.append(Line("extra models", mounted * 4,
                          f"reward model: a LoRA adapter of the same base ({_count(mounted)} params at fp32) mounted "
                          f"on it; one of another base adds {_count(shape.total)} params"))
    buckets = 2 if n > 1 and not setup.zero else 1  # DDP keeps a bucket copy of every gradient
    lines.append(Line("gradients", buckets * trainable * w_t / split[2],
                      f"{_count(trainable)} × {w_t} bytes" + (" × 2 (DDP buckets)" if buckets > 1 else "") + over[2],
                      "gradients"))
    state = OPTIMIZERS[setup.optim] or (8 if setup.zero else 2 * w_t)
    master = 4 if setup.zero and w_t == 2 else 0  # DeepSpeed keeps fp32 master weights and fp32 states
    lines.append(Line("optimizer", trainable * (state + master) / split[1],
                      f"{setup.optim}: {state} bytes of states"
                      + (f" + {master} of fp32 master weight" if master else "") + " per trainable param" + over[1]))
    return lines


def training_lines(shape: ModelShape, setup: Setup, hardware: Hardware, trainable: int) -> list[Line]:
    """Activations and logits of the update; the KV cache of rollouts, which comes and goes before it."""
    needs, b = STAGE_NEEDS[setup.stage], activation_dtype_bytes(setup, hardware)
    flipped = replace(setup, gradient_checkpointing=not setup.gradient_checkpointing)
    alternative = (f"{'off' if setup.gradient_checkpointing else 'on'}: "
                   f"{activation_bytes(shape, flipped, hardware) / GiB:.2f} GiB")
    lines = [Line("activations", activation_bytes(shape, setup, hardware),
                  f"{tokens(setup):,} tokens × {shape.layers} layers, checkpointing "
                  f"{'on' if setup.gradient_checkpointing else 'off'} ({alternative})", "forward")]
    if not setup.adapter:  # the loss's backward makes the head's gradient first, with every activation alive
        lines.append(Line("head gradient", shape.head_params * trainable_bytes(setup),
                          f"{_count(shape.head_params)} × {trainable_bytes(setup)} bytes, at the start of the "
                          "backward",
                          "forward"))
    scored = tokens(setup) // 2 if needs.critic else tokens(setup)  # the critic's pass ends in a value, not logits
    positions = min(scored, setup.loss_chunk_size) if needs.chunked_loss else scored
    width = 1 if needs.head == "reward" else shape.vocab  # a reward model scores, it predicts no tokens
    lines.append(Line("logits", positions * width * (2 * b + 8),
                      f"{positions:,} positions × {width:,} {'score' if width == 1 else 'vocabulary'} × "
                      f"{2 * b + 8} bytes" + (" (one loss chunk)" if needs.chunked_loss else ""), "forward"))
    if hardware.cuda and trainable_bytes(setup) == 4 and not setup.gradient_checkpointing:
        lines.append(Line("autocast weight copies", 2 * trainable, "16-bit casts of the fp32 trainable weights, kept "
                          "for the backward (checkpointing frees them after the forward)", "forward"))
    if needs.generates:
        cache = 2 * shape.layers * shape.kv_hidden * b * setup.batch * setup.max_length
        lines.append(Line("KV cache", cache, f"rollouts: 2 × {shape.layers} layers × {shape.kv_hidden} × {b} bytes "
                          f"× {setup.batch * setup.max_length:,} tokens, freed before the update", "rollout"))
    return lines


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def _weight_label(setup: Setup) -> str:
    return {32: "fp32", 16: "16-bit", 8: "8-bit (LLM.int8)", 4: "4-bit NF4"}[setup.bits]
