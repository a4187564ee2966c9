"""The causal-LM trainer: a plain `transformers.Trainer` with the chunked loss, per-sample NEFTune and a
divergence check — the parts of SFT/PT training the stock classes get wrong or make slow."""

from __future__ import annotations

import inspect
import logging
import math
import types
from dataclasses import dataclass

import torch
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from medgpt.data.collators import sample_lengths
from medgpt.models.attention import flash_packed_kwargs
from medgpt.models.output_head import OutputHead, Unsupported, read_output_head
from medgpt.training.loss import chunked_lm_loss

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


@dataclass(frozen=True)
class ChunkedLoss:
    chunk_size: int
    output: OutputHead


def use_chunked_loss(model, chunk_size: int = 1024) -> bool:
    """Make `model(..., labels=…)` return the chunked loss (and no logits) — on this instance only. Returns False,
    leaving the stock loss, when the model's forward does something to its logits or loss that
    `models/output_head.py` cannot read (logged).

    Patching the instance keeps every wrapper on the call path (peft, DDP, FSDP, DeepSpeed) intact: they all end
    up calling this forward. It is a method bound to the instance, so a deep copy runs its own weights.
    Without labels (generation, evaluation of logits) the original forward runs.
    """
    try:
        output = read_output_head(model)
        if "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
            raise Unsupported(f"{type(model).__name__}.forward has no logits_to_keep")
        model.get_decoder()
    except (Unsupported, AttributeError, NotImplementedError) as reason:
        logger.info("loss: the stock causal-LM loss, not the chunked one (%s)", reason)
        return False
    model._medgpt_chunked = ChunkedLoss(chunk_size, output)
    model._medgpt_stock_forward = model.__dict__.get("forward")  # an instance forward set earlier, if any
    model.forward = types.MethodType(_chunked_forward, model)
    if output.steps or output.router_aux_loss_coef is not None:
        logger.info("loss: chunked, with the model's logit steps %s%s", list(output.steps),
                    f" and router loss x {output.router_aux_loss_coef:g}" if output.router_aux_loss_coef else "")
    return True


def _stock_forward(model):
    own = model.__dict__.get("_medgpt_stock_forward")
    return own if own is not None else types.MethodType(type(model).forward, model)


class _NoLogits(torch.nn.Module):
    """Stands in for the head while the model's own forward runs: logits for no position, nothing computed."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], self.vocab_size)


def _chunked_forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
    stock = _stock_forward(self)
    if labels is None:
        return stock(input_ids=input_ids, **kwargs)
    spec: ChunkedLoss = self._medgpt_chunked
    kwargs["use_cache"] = False
    # The model's own forward runs (router losses, per-model inputs) with the head swapped out, keeping no
    # logits; the decoder's final hidden states are taken on the way out and projected through the real head a
    # chunk at a time. The head must run once per forward only: FSDP2 crashes in backward (SIGSEGV, torch 2.13)
    # when a module of its tail group is called twice in one forward, and DeepSpeed would gather it twice.
    head = self.get_output_embeddings()  # looked up per call: peft may have wrapped it (modules_to_save)
    hidden = []
    handle = self.get_decoder().register_forward_hook(lambda module, args, out: hidden.append(out[0]))
    device = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).device
    attribute = spec.output.attribute
    original = getattr(self, attribute)
    setattr(self, attribute, _NoLogits(self.config.get_text_config().vocab_size))
    try:
        outputs = stock(input_ids=input_ids, logits_to_keep=torch.zeros(0, dtype=torch.long, device=device), **kwargs)
    finally:
        setattr(self, attribute, original)
        handle.remove()
    loss, _ = chunked_lm_loss(hidden[-1], labels, head, spec.chunk_size, spec.output, num_items_in_batch)
    aux = getattr(outputs, "aux_loss", None)
    if spec.output.router_aux_loss_coef is not None and aux is not None:
        loss = loss + spec.output.router_aux_loss_coef * aux.to(loss.device)
    return CausalLMOutputWithPast(loss=loss)


class NEFTune:
    """Noisy embeddings (Jain et al. 2023): uniform noise scaled by alpha / sqrt(L * d) during training,
    with L the length of the sample each token belongs to — also in packed rows, where transformers' own
    hook would use the whole row's length and under-noise every sample."""

    def __init__(self, model, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not module.training or self.lengths is None or self.lengths.shape != output.shape[:2]:
            return output
        lengths = self.lengths.to(output.device, output.dtype)
        scale = torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * output.shape[-1]), 0.0)
        return output + torch.empty_like(output).uniform_(-1, 1) * scale.unsqueeze(-1)

    def remove(self) -> None:
        self.handle.remove()


class CausalLMTrainer(Trainer):
    def __init__(self, *args, neftune_alpha: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # our forward divides by num_items_in_batch itself
        self.neftune = NEFTune(self.model, neftune_alpha) if neftune_alpha else None
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._flash = base.config._attn_implementation.startswith("flash_attention")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._flash and "position_ids" in inputs:  # varlen boundaries once per batch, not once per layer
            inputs = {**inputs, **flash_packed_kwargs(inputs["position_ids"])}
        if self.neftune is not None:
            self.neftune.lengths = sample_lengths(inputs["position_ids"], inputs.get("attention_mask"))
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = loss[0] if isinstance(loss, tuple) else loss
        if model.training and not torch.isfinite(value.detach()).all():
            raise TrainingDiverged(diagnose_nan(self.args, self.state.global_step, float(value.detach())))
        return loss


def diagnose_nan(args, step: int, value: float) -> str:
    kind = "nan" if math.isnan(value) else "inf"
    if args.fp16:
        cause = "fp16 overflowed: train with bf16 (Ampere or newer GPUs) or fp32, or lower learning_rate"
    else:
        cause = f"lower learning_rate (now {args.learning_rate:g}), set max_grad_norm (now {args.max_grad_norm}), " \
                "and check the data for empty or extreme samples"
    return f"the training loss became {kind} at step {step}: {cause}. Stopped so no broken checkpoint is saved."
