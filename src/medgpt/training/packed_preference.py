"""What the preference trainers (DPO family, KTO) share on top of TRL's: scoring packed sequences through our
chunked LM head, the reference pass over the same rows, and TRL's token-level metrics from those scores.

Why not TRL's own path: `DPOTrainer` / `KTOTrainer` in TRL 1.16 pad every sequence of a batch to the longest and
score them with `add_fused_lm_head`, which on a CPU projects every position (prompt and padding included) through
the LM head; their `padding_free` option is disabled ("temporarily unavailable" since the refactor). The trainers
keep TRL for everything else: options, reference-model and "ref"-adapter handling, `precompute_ref_log_probs`
(its dataset pass and cache, fed by our `compute_ref_log_probs`), `sync_ref_model`, metrics averaging and logging.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from medgpt.arguments import documented
from medgpt.training.sequence_logps import TokenLogps, per_sequence, use_token_logps

MODEL_INPUTS = ("input_ids", "position_ids", "labels", "sequence_ids", "attention_mask")


def sequence_count(inputs: dict, prefix: str = "") -> int:
    return int(inputs[prefix + "sequence_ends"].numel())


def tokens_in(inputs: dict, prefix: str = "") -> torch.Tensor:
    """Real (non-padding) tokens of a collated group: the whole packed row, or the attention mask's ones."""
    mask = inputs.get(prefix + "attention_mask")
    ids = inputs[prefix + "input_ids"]
    return mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)


class PackedScoring:
    """Mixin for TRL's preference trainers: `score` the policy, `reference_scores` under no gradient."""

    def use_packed_scoring(self, chunk_size: int) -> None:
        """Patch the policy (and a separate reference model) so that scoring calls return `TokenLogps`; packed
        rows attend per sequence (`sdpa_packed` under SDPA, transformers' packed mask otherwise)."""
        from medgpt.training.recipe import use_packed_attention

        for model in (self.model, self.ref_model):
            if model is None:
                continue
            base = self.accelerator.unwrap_model(model)
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            use_token_logps(base, chunk_size)
            use_packed_attention(model)

    def score(self, model, inputs: dict, prefix: str = "", statistics: tuple[str, ...] = (),
              router_logits: bool = False) -> TokenLogps:
        kwargs = {name: inputs[prefix + name] for name in MODEL_INPUTS if prefix + name in inputs}
        if router_logits:
            kwargs["output_router_logits"] = True
        return model(**kwargs, use_cache=False, token_statistics=statistics)

    def reference_context(self):
        """The reference as TRL defines it: the separate model, else the adapter "ref" (a frozen copy of a starting
        adapter), else the policy with its adapters disabled."""
        from trl.trainer.utils import use_adapter

        if self.ref_model is not None or not hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            return contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def reference_scores(self, inputs: dict, prefix: str = "", model=None) -> TokenLogps:
        from trl.models.utils import disable_gradient_checkpointing

        model = model if model is not None else (self.ref_model or self.model)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self.reference_context():
            return self.score(model, inputs, prefix)

    def log_token_metrics(self, mode: str, scores: TokenLogps, count: int, chosen: torch.Tensor,
                          paired: bool) -> None:
        """TRL's `entropy`, `logits/chosen`, `logits/rejected` and (DPO, `paired`) `mean_token_accuracy` on the
        chosen replies, token-weighted over every process; `chosen` (count,) marks the chosen (desirable)
        sequences. As TRL: DPO logs 0 for an empty side, KTO skips it."""
        metrics = self._metrics[mode]
        tokens = per_sequence(torch.ones_like(scores.logps), scores.sequence, count)
        entropy = per_sequence(scores.entropy, scores.sequence, count)
        logit = per_sequence(scores.mean_logit, scores.sequence, count)
        top1 = per_sequence(scores.is_top1.float(), scores.sequence, count) if paired else tokens
        sums = torch.stack([entropy.sum(), tokens.sum(), logit[chosen].sum(), tokens[chosen].sum(),
                            logit[~chosen].sum(), tokens[~chosen].sum(), top1[chosen].sum()])
        total = self.accelerator.gather_for_metrics(sums[None]).sum(0).tolist()
        metrics["entropy"].append(total[0] / total[1] if total[1] else 0.0)
        for name, value, weight in (("logits/chosen", total[2], total[3]), ("logits/rejected", total[4], total[5])):
            if weight or paired:
                metrics[name].append(value / weight if weight else 0.0)
        if paired:
            metrics["mean_token_accuracy"].append(total[6] / total[3] if total[3] else 0.0)

    def count_tokens(self, mode: str, inputs: dict) -> None:
        """TRL's `num_tokens`: real tokens trained on so far, over every process."""
        if mode == "train":
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(tokens_in(inputs)[None]).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


@dataclass
class PackingArguments:
    """How the preference stages (RM, DPO family, KTO) batch their sequences."""

    packing: bool = documented(
        """Padding-free batches: every sequence of a batch (each pair's chosen and rejected, each KTO example and
        its mismatched KL pair) is concatenated into one row with per-sequence position ids, so no compute is
        spent on padding and sequences never attend to each other (SDPA per sequence, or flash-attention's
        varlen). false pads every sequence to the batch's longest, as TRL does; the values are the same.
        TRL's own padding_free, pad_to_multiple_of and truncation_mode are refused in these stages (medgpt
        batches and truncates the sequences itself, counts in train_results.json).""",
        default=True,
    )


# TRL batching options our collators replace: refused when given, with what to do instead (never ignored).
UPSTREAM_BATCHING = {
    "padding_free": "medgpt's preference batches are padding-free by default: set packing: true | false instead",
    "pad_to_multiple_of": "medgpt packs sequences into one row (or pads to the longest with packing: false): remove it",
    "truncation_mode": "medgpt cuts the prompt from the left, then the replies from the right, before batching "
                       "(counts in train_results.json): remove it",
}


def refuse_upstream_batching(given: dict) -> None:
    from medgpt.config import ConfigError

    for name, fix in UPSTREAM_BATCHING.items():
        if name in given:
            raise ConfigError(f"{name}: {fix}")
