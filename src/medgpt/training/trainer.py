"""The causal-LM trainer: a plain `transformers.Trainer` with the chunked loss, per-sample NEFTune and a
divergence check — the parts of SFT/PT training the stock classes get wrong or make slow."""

from __future__ import annotations

import math

import torch
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from medgpt.data.collators import sample_lengths
from medgpt.training.loss import chunked_lm_loss


class TrainingDiverged(RuntimeError):
    pass


def use_chunked_loss(model, chunk_size: int = 1024) -> None:
    """Make `model(..., labels=…)` return the chunked loss (and no logits) — on this instance only.

    Patching the instance keeps every wrapper on the call path (peft, DDP, DeepSpeed) intact: they all end up
    calling this forward. Without labels (generation, evaluation of logits) the original forward runs.
    """
    original = model.forward
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(input_ids=input_ids, **kwargs)
        kwargs.pop("use_cache", None)
        outputs = model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs)
        # Looked up per call: peft may have wrapped the head (modules_to_save) after this patch.
        head = model.get_output_embeddings()
        loss, _ = chunked_lm_loss(outputs.last_hidden_state, labels, head, chunk_size, softcap, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = forward


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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
