"""What `medgpt plan` says: the per-GPU table, the verdict, the changes that make a run fit (cheapest first,
each with its price) and the dtype to train in, for a GPU named from a small table or this machine's.
The numbers come from `medgpt.plan.memory`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from medgpt.config import ConfigError
from medgpt.plan.memory import (
    OPTIMIZERS,
    PHASES,
    STAGE_NEEDS,
    Estimate,
    GiB,
    Hardware,
    ModelShape,
    Setup,
    estimate,
    model_shape,
    read_model_config,
)


# Memory as sold (GPU makers' "GB" are GiB); bf16 from Ampere (compute capability 8.0) on.
GPUS = {gpu.name: gpu for gpu in (
    Hardware("H200", 141, True), Hardware("H100", 80, True), Hardware("H100-NVL", 94, True),
    Hardware("H800", 80, True), Hardware("H20", 96, True), Hardware("A100", 80, True),
    Hardware("A100-40GB", 40, True), Hardware("A800", 80, True), Hardware("L40S", 48, True),
    Hardware("A6000", 48, True), Hardware("A40", 48, True), Hardware("L4", 24, True), Hardware("A10", 24, True),
    Hardware("A10G", 24, True), Hardware("4090", 24, True), Hardware("3090", 24, True), Hardware("4080", 16, True),
    Hardware("3080", 10, True), Hardware("V100", 32, False), Hardware("V100-16GB", 16, False),
    Hardware("T4", 16, False), Hardware("P100", 16, False), Hardware("P40", 24, False),
)}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]|rtx|nvidia|tesla|geforce", "", name.lower())


def find_gpu(name: str) -> Hardware:
    for gpu in GPUS.values():
        if _key(gpu.name) == _key(name) or _key(gpu.name) == _key(name).removesuffix("80gb"):
            return gpu
    raise ConfigError(f"unknown GPU '{name}' (known: {', '.join(GPUS)}); or give --gpu-memory, e.g. 24GiB")


def parse_memory(text: str) -> float:
    """'24GiB', '24GB', '24' -> 24.0 (GiB; a card sold as 24 GB has 24 GiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise ConfigError(f"cannot read GPU memory '{text}': write it like 24GiB")
    return float(match.group(1))


def local_hardware() -> Hardware:
    """The first CUDA GPU of this machine, else the CPU with the machine's RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware(props.name, props.total_memory / GiB, torch.cuda.is_bf16_supported())
    return Hardware("CPU", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, False, cuda=False)


def hardware_for(gpu: str | None, memory: str | None) -> Hardware:
    """--gpu from the table, else this machine's; --gpu-memory overrides the size (on a CPU-only machine it
    means a GPU of that size, with bf16)."""
    hardware = find_gpu(gpu) if gpu else local_hardware()
    if memory:
        size = parse_memory(memory)
        hardware = replace(hardware, memory_gib=size) if hardware.cuda else Hardware("GPU", size, True)
    return hardware


def default_bits(method: str, hardware: Hardware) -> int:
    """What medgpt would load: 4-bit for QLoRA, fp32 on a CPU and for full training without bf16 (fp16 mixed
    precision needs fp32 weights), else 16-bit."""
    if method == "qlora":
        return 4
    if not hardware.cuda or (method in ("full", "freeze") and not hardware.bf16):
        return 32
    return 16


def report(model: str, setup: Setup, hardware: Hardware, trust_remote_code: bool = False) -> str:
    """Read the model's config.json and render its plan."""
    config = read_model_config(model, trust_remote_code)
    shape = model_shape(config, STAGE_NEEDS[setup.stage].head, trust_remote_code)
    return render(estimate(shape, setup, hardware), model)


@dataclass(frozen=True)
class Fix:
    change: str  # what to write in the config
    tradeoff: str  # its price, one line
    estimate: Estimate  # with this and every earlier fix applied


def candidate_fixes(setup: Setup):
    """(config change, trade-off, setup) in order of cost; each setup carries the changes before it."""
    if not setup.gradient_checkpointing:
        setup = replace(setup, gradient_checkpointing=True)
        yield ("gradient_checkpointing: true", "~30% more compute per step: activations are rebuilt in the backward",
               setup)
    if setup.batch > 1:
        setup = replace(setup, batch=1, accumulation=setup.accumulation * setup.batch)
        yield (f"per_device_train_batch_size: 1, gradient_accumulation_steps: {setup.accumulation}",
               "the same effective batch in more, smaller passes: lower GPU utilisation", setup)
    for stage, price in ((2, "gradients and optimizer states split across GPUs: more communication per step"),
                         (3, "weights split too, each layer gathered before use: the slowest ZeRO stage")):
        if setup.gpus > 1 and setup.zero < stage:
            setup = replace(setup, zero=stage)
            yield f"deepspeed: configs/deepspeed/zero{stage}.json", price, setup
    if not setup.adapter and OPTIMIZERS[setup.optim] != 2:
        setup = replace(setup, optim="paged_adamw_8bit")
        yield ("optim: paged_adamw_8bit", "8-bit AdamW states (bitsandbytes): 2 bytes per weight instead of 4-8, "
               "near-identical loss curves; paging absorbs spikes", setup)
    if not setup.adapter:
        setup = replace(setup, method="lora", bits=16)
        yield ("use_peft: true", "LoRA trains ~1% of the weights: far less memory, a slightly lower ceiling with "
               "plenty of data", setup)
    if setup.bits > 8:
        setup = replace(setup, method="lora", bits=8)
        yield "load_in_8bit: true", "8-bit base weights: half of bf16's memory, slower steps", setup
    if setup.bits > 4:
        setup = replace(setup, method="qlora", bits=4)
        yield ("qlora: true (instead of load_in_8bit)",
               "4-bit NF4 base weights (QLoRA): a quarter of bf16's memory, slower steps, a small quality loss", setup)


def fixes(shape: ModelShape, setup: Setup, hardware: Hardware) -> list[Fix]:
    """The changes, cumulatively, up to the first that fits; then a shorter max_length if still needed."""
    found, total = [], estimate(shape, setup, hardware).total
    for change, tradeoff, setup in candidate_fixes(setup):
        fixed = estimate(shape, setup, hardware)
        if fixed.total < 0.99 * total:  # a change that saves nothing here is not worth its price
            found.append(Fix(change, tradeoff, fixed))
            total = fixed.total
        if fixed.fits:
            return found
    length = setup.max_length // 2
    while length >= 128:
        shorter = estimate(shape, replace(setup, max_length=length), hardware)
        if shorter.fits:
            found.append(Fix(f"max_length: {length}", "longer samples are cut (see `medgpt data check --model` for "
                             "your data's token lengths)", shorter))
            break
        length //= 2
    return found


def largest_batch(shape: ModelShape, setup: Setup, hardware: Hardware, limit: int = 256) -> int:
    """The largest micro-batch, doubling from the given one, that still fits."""
    batch = setup.batch
    while batch * 2 <= limit and estimate(shape, replace(setup, batch=batch * 2), hardware).fits:
        batch *= 2
    return batch


def dtype_advice(hardware: Hardware, setup: Setup) -> str:
    if not hardware.cuda:
        return ("fp32 (torch_dtype: fp32 or auto): CPUs train in fp32; bf16 is slow there and fp16 mixed precision "
                "needs a CUDA GPU")
    if hardware.bf16:
        return (f"bf16 (torch_dtype: auto or bf16, bf16: true; medgpt picks both on this GPU): the {hardware.name} "
                "has bf16, fp32's range in 16 bits, so no loss scaling is needed")
    weights = "fp32 weights (torch_dtype: fp32) with " if setup.method in ("full", "freeze") else ""
    return (f"fp16 with loss scaling ({weights}fp16: true): the {hardware.name} has no bf16. fp16 overflows above "
            "65,504: when the loss goes to 0 or NaN, lower learning_rate and keep max_grad_norm at 1.0 (medgpt "
            "stops on a NaN loss and says so); bf16 on an Ampere or newer GPU avoids it")


def describe(setup: Setup) -> str:
    if setup.method in ("lora", "qlora"):
        base = {32: "fp32", 16: "16-bit", 8: "8-bit", 4: "4-bit"}[setup.bits]
        what = f"LoRA r={setup.lora_rank} ({setup.lora_targets}) on a {base} base"
    elif setup.method == "freeze":
        what = f"top {setup.trainable_layers} layers, {setup.bits}-bit"
    else:
        what = "full, " + ("fp32 weights + 16-bit compute" if setup.bits == 32 else "16-bit weights")
    zero = f", ZeRO-{setup.zero}" if setup.zero else ""
    return (f"{setup.stage}, {what}, batch {setup.batch} × {setup.max_length} tokens, {setup.optim}"
            f"{', gradient checkpointing' if setup.gradient_checkpointing else ''}, {setup.gpus} GPU(s){zero}")


def render(plan: Estimate, model: str) -> str:
    """The report `medgpt plan` prints."""
    hw, setup, shape = plan.hardware, plan.setup, plan.shape
    where = f"{setup.gpus} × {hw.name} ({hw.memory_gib:g} GiB)" if hw.cuda else f"CPU ({hw.memory_gib:.0f} GiB RAM)"
    out = [f"medgpt plan: {model}", f"  {describe(setup)}", f"  on {where}", "",
           f"parameters: {shape.total:,} total, {plan.trainable:,} trainable "
           f"({100 * plan.trainable / shape.total:.2f}%)",
           "", f"{'memory per GPU' if hw.cuda else 'memory'}{'GiB':>24}"]
    for line in plan.lines:
        out.append(f"  {line.label:<28}{line.bytes / GiB:>10.2f}   {line.how}")
    budget = hw.memory_gib * GiB
    phases = {name: sum(line.bytes for line in plan.lines if line.phase == name) / GiB for name in PHASES}
    alive = ", ".join(f"{name} {size:.2f}" for name, size in phases.items() if size)
    out.append(f"  {'total (peak)':<28}{plan.total / GiB:>10.2f}   of {hw.memory_gib:g}; the rest plus the largest of "
               f"{alive} (the backward trades activations for gradients)")
    out.append("")
    if plan.fits:
        out.append(f"verdict: fits, {(budget - plan.total) / GiB:.1f} GiB to spare; the largest micro-batch that fits "
                   f"is {largest_batch(shape, setup, hw)}")
    else:
        out.append(f"verdict: does not fit ({plan.total / GiB:.1f} GiB needed, {hw.memory_gib:g} available). "
                   "Changes in order of cost, each on top of the ones before:")
        found = fixes(shape, setup, hw)
        for fix in found:
            mark = "fits" if fix.estimate.fits else "still too big"
            out.append(f"  {fix.estimate.total / GiB:7.1f} GiB {mark:<14} {fix.change}")
            out.append(f"{'':29}{fix.tradeoff}")
        if not found or not found[-1].estimate.fits:
            out.append("  none of these is enough: use more GPUs with ZeRO-3 (--gpus N --deepspeed zero3), or GPUs "
                       "with more memory")
    out += ["", "dtype: " + dtype_advice(hw, setup)]
    return "\n".join(out)
