"""The DPO family's trainer: TRL's `DPOTrainer` for options, reference handling and logging, our packed pairs and
chunked LM head for the forward (see `training/packed_preference.py` for why), our loss functions
(`training/preference_loss.py`: TRL's loss types restated, and SimPO / ORPO)."""

from __future__ import annotations

import torch
from trl import DPOTrainer

from medgpt.data.collators import PreferencePairCollator
from medgpt.training.packed_preference import PackedScoring, sequence_count
from medgpt.training.preference_loss import DPOSettings, PairLogps, dpo_loss, orpo_loss, simpo_loss
from medgpt.training.sequence_logps import TokenLogps, per_sequence, position_in_sequence, use_token_logps
from medgpt.training.trainer import TrainingDiverged, diagnose_nan

STATISTICS = ("entropy", "mean_logit", "is_top1")  # what TRL's DPOTrainer logs besides the rewards


class PreferenceTrainer(PackedScoring, DPOTrainer):
    """DPOTrainer on our tokenised pairs (`prompt_ids` / `chosen_ids` / `rejected_ids`), packed padding-free.

    `reference_free`: None (TRL's loss types), "simpo" or "orpo". `keep_reference_adapter`: keep TRL's frozen
    copy ("ref") of an adapter the model already had; otherwise it is dropped and the reference is the model
    with adapters disabled. `packing` false pads each sequence to the batch's longest instead (same results).
    """

    def __init__(self, *args, reference_free: str | None = None, simpo_gamma: float = 0.5,
                 keep_reference_adapter: bool = False, chunk_size: int = 1024, packing: bool = True, **kwargs):
        from peft import PeftModel

        self.reference_free, self.simpo_gamma = reference_free, simpo_gamma
        training = kwargs["args"]
        model = kwargs["model"]
        # Patched before TRL's __init__, which may precompute the reference log-probs through them.
        for network in (model, kwargs.get("ref_model")):
            if network is not None:
                use_token_logps(network.get_base_model() if isinstance(network, PeftModel) else network, chunk_size)
        kwargs["data_collator"] = PreferencePairCollator(kwargs["processing_class"].pad_token_id, packing)
        # With no reference needed and full training, TRL would load a second model from disk; its
        # precompute path is the one that loads none, and `_precompute_ref_logps` below then computes nothing.
        skip_reference = reference_free is not None and not isinstance(model, PeftModel) \
            and not training.precompute_ref_log_probs
        if skip_reference:
            training.precompute_ref_log_probs = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if skip_reference:
                training.precompute_ref_log_probs = False
                self.precompute_ref_logps = False
        peft_config = getattr(self.model, "peft_config", {})
        if "ref" in peft_config and (reference_free or not keep_reference_adapter):
            self.model.delete_adapter("ref")
        self.use_packed_scoring(chunk_size)

    @property
    def settings(self) -> DPOSettings:
        return DPOSettings(self.beta, self.label_smoothing, self.f_divergence_type, self.f_alpha_divergence_coef,
                           self.args.discopop_tau)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL 1.16 re-tokenises any dataset (it would run `extract_prompt` on ours and fail); ours are final.
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.reference_free:
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # ------------------------------------------------------------------------------------------ log-probs

    def sequence_logps(self, scores: TokenLogps, count: int) -> torch.Tensor:
        """(2B,) summed reply log-probs; with `ld_alpha` (LD-DPO) the tokens past the shorter reply of each pair
        weigh ld_alpha, as TRL does."""
        if self.ld_alpha is None:
            return per_sequence(scores.logps, scores.sequence, count)
        lengths = torch.bincount(scores.sequence, minlength=count)
        shared = torch.minimum(*lengths.chunk(2)).repeat(2)  # (2B,) the pair's shorter length, for both sides
        within = position_in_sequence(scores.sequence, count) < shared[scores.sequence]
        weights = torch.where(within, 1.0, self.ld_alpha)
        return per_sequence(scores.logps * weights, scores.sequence, count)

    def compute_ref_log_probs(self, model, inputs):
        """The reference's (chosen, rejected) log-probs of one collated batch: TRL's precompute pass calls it."""
        with self.accelerator.autocast():
            scores = self.reference_scores(inputs, model=model)
        return self.sequence_logps(scores, sequence_count(inputs)).chunk(2)

    def reference_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.sequence_logps(self.reference_scores(inputs), sequence_count(inputs)).chunk(2)

    # ------------------------------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        count = sequence_count(inputs)  # 2B sequences: B chosen, then B rejected
        wanted = STATISTICS + (("log_sum_sq",) if self.use_weighting else ())
        scores = self.score(model, inputs, statistics=wanted, router_logits=self.aux_loss_enabled)
        tokens = torch.bincount(scores.sequence, minlength=count).float()
        if self.reference_free:
            loss = self._reference_free_loss(mode, scores, count, tokens)
        else:
            chosen_tokens, rejected_tokens = tokens.chunk(2)
            chosen, rejected = self.sequence_logps(scores, count).chunk(2)
            ref_chosen, ref_rejected = self.reference_logps(inputs)
            pairs = PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)
            loss = dpo_loss(self.loss_types, self.loss_weights, pairs, self.settings, self._wpo_weights(scores, count))
            self._log_rewards(mode, self.beta * pairs.chosen_logratios.detach(),
                              self.beta * pairs.rejected_logratios.detach(), chosen.detach(), rejected.detach())
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * scores.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(scores.aux_loss).mean().item())
        if model.training and not torch.isfinite(loss.detach()):
            raise TrainingDiverged(diagnose_nan(self.args, self.state.global_step, float(loss.detach())))
        self.log_token_metrics(mode, scores, count, torch.arange(count, device=tokens.device) < count // 2, paired=True)
        self.count_tokens(mode, inputs)
        return (loss, scores) if return_outputs else loss

    def _wpo_weights(self, scores: TokenLogps, count: int) -> torch.Tensor | None:
        """WPO (Zhou et al. 2024, Eq. 2): each pair weighted by both replies' length-normalised probability."""
        if not self.use_weighting:
            return None
        with torch.no_grad():
            aligned = per_sequence(scores.logps.detach() - scores.log_sum_sq, scores.sequence, count)
            weights = torch.exp(aligned / torch.bincount(scores.sequence, minlength=count).clamp(min=1))
            chosen, rejected = weights.chunk(2)
            return chosen * rejected

    def _reference_free_loss(self, mode: str, scores: TokenLogps, count: int, tokens: torch.Tensor) -> torch.Tensor:
        """SimPO or ORPO on the mean reply log-probs; 'rewards' are β·mean log p, as the papers report them."""
        sums = per_sequence(scores.logps, scores.sequence, count)
        chosen_sum, _ = sums.chunk(2)
        chosen_avg, rejected_avg = (sums / tokens.clamp(min=1)).chunk(2)
        chosen_tokens, _ = tokens.chunk(2)
        if self.reference_free == "simpo":
            loss = simpo_loss(chosen_avg, rejected_avg, self.beta, self.simpo_gamma, self.label_smoothing).mean()
        else:
            nll = -chosen_sum.sum() / chosen_tokens.sum().clamp(min=1)
            loss, log_odds = orpo_loss(nll, chosen_avg, rejected_avg, self.beta)
            gather = self.accelerator.gather_for_metrics
            self._metrics[mode]["nll_loss"].append(gather(nll.detach()).mean().item())
            self._metrics[mode]["log_odds_ratio"].append(gather(log_odds.detach()).mean().item())
        # logps/* per token here: what the loss uses
        self._log_rewards(mode, self.beta * chosen_avg.detach(), self.beta * rejected_avg.detach(),
                          chosen_avg.detach(), rejected_avg.detach())
        return loss

    def _log_rewards(self, mode: str, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> None:
        gather, metrics = self.accelerator.gather, self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation logs the same metrics through `_metrics`; there are no logits to return (none are built).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
