"""KTO's trainer: TRL's `KTOTrainer` for options, reference handling and logging, our packed examples and chunked
LM head for the forward (see `training/packed_preference.py` for why), TRL's two loss types restated."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import KTOConfig, KTOTrainer

from medgpt.data.collators import CompletionCollator
from medgpt.training.packed_preference import PackedScoring, sequence_count
from medgpt.training.sequence_logps import TokenLogps, per_sequence, use_token_logps
from medgpt.training.trainer import TrainingDiverged, diagnose_nan

STATISTICS = ("entropy", "mean_logit")  # what TRL's KTOTrainer logs besides the rewards


def with_kl_completions(features: dict) -> dict:
    """Give each example the completion of its batch neighbour: (x_i, y_{i-1}), wrapping within the batch."""
    completions = features["completion_ids"]
    features["KL_completion_ids"] = completions[-1:] + completions[:-1]
    return features


def kto_losses(loss_type: str, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, kl: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(desirable, undesirable) per-example losses. kto: the KTO paper's Eq. 7, the value of each log-ratio
    measured against the KL reference point; apo_zero_unpaired: APO-zero (Eq. 7 of the APO paper) unpaired."""
    if loss_type == "kto":
        return 1 - F.sigmoid(beta * (chosen_logratios - kl)), 1 - F.sigmoid(beta * (kl - rejected_logratios))
    if loss_type == "apo_zero_unpaired":
        return 1 - F.sigmoid(beta * chosen_logratios), F.sigmoid(beta * rejected_logratios)
    raise ValueError(f"unknown KTO loss_type '{loss_type}'")


class KTOFeaturesTrainer(PackedScoring, KTOTrainer):
    """`KTOTrainer` on our tokenised features (`prompt_ids`, `completion_ids`, `label`), packed padding-free.

    TRL 1.16's `_prepare_dataset` always re-derives the prompt from text columns and re-tokenises (it fails on
    a dataset that has only ids), so this override keeps only the part we need: the KL completions, built on the
    batches the sequential sampler will form.
    """

    def __init__(self, *args, chunk_size: int = 1024, packing: bool = True, **kwargs):
        from peft import PeftModel

        for network in (kwargs["model"], kwargs.get("ref_model")):  # before TRL's precompute pass uses them
            if network is not None:
                use_token_logps(network.get_base_model() if isinstance(network, PeftModel) else network, chunk_size)
        kwargs["data_collator"] = CompletionCollator(kwargs["processing_class"].pad_token_id, packing)
        super().__init__(*args, **kwargs)
        self.use_packed_scoring(chunk_size)

    def _prepare_dataset(self, dataset, processing_class, args: KTOConfig, dataset_name: str):
        if not self.calculate_KL:
            return dataset
        size = args.per_device_train_batch_size if dataset_name == "train" else args.per_device_eval_batch_size
        return dataset.map(with_kl_completions, batched=True, batch_size=size)

    def summed(self, scores: TokenLogps, inputs: dict, prefix: str = "") -> torch.Tensor:
        return per_sequence(scores.logps, scores.sequence, sequence_count(inputs, prefix))

    def compute_ref_log_probs(self, model, inputs):
        """The reference's (completion, KL completion or None) log-probs of one batch: TRL's precompute calls it."""
        with self.accelerator.autocast():
            completions = self.summed(self.reference_scores(inputs, model=model), inputs)
            mismatched = self.summed(self.reference_scores(inputs, "KL_", model), inputs, "KL_") \
                if self.calculate_KL else None
        return completions, mismatched

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        labels = inputs["label"].bool()
        count = sequence_count(inputs)
        if self.calculate_KL:
            with torch.no_grad():  # the policy's side of the KL reference point carries no gradient (as TRL)
                kl_logps = self.summed(self.score(model, inputs, "KL_"), inputs, "KL_")
        scores = self.score(model, inputs, statistics=STATISTICS, router_logits=self.aux_loss_enabled)
        logps = self.summed(scores, inputs)
        if self.precompute_ref_logps:
            ref_logps, ref_kl_logps = inputs["ref_logps"], inputs.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        if self.calculate_KL:
            kl = self.accelerator.gather_for_metrics((kl_logps - ref_kl_logps).mean().detach()).mean().clamp(min=0)
        else:
            kl = torch.zeros((), device=logps.device)
        logratios = logps - ref_logps
        desirable, undesirable = kto_losses(self.loss_type, logratios[labels], logratios[~labels], kl, self.beta)
        loss = torch.cat([self.desirable_weight * desirable, self.undesirable_weight * undesirable]).nanmean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * scores.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(scores.aux_loss).mean().item())
        if model.training and not torch.isfinite(loss.detach()):
            raise TrainingDiverged(diagnose_nan(self.args, self.state.global_step, float(loss.detach())))
        self._metrics[mode]["kl"].append(kl.item())
        self.log_token_metrics(mode, scores, count, labels, paired=False)
        self.count_tokens(mode, inputs)
        self._log_rewards(mode, labels, self.beta * logratios.detach(), logps.detach())
        return (loss, scores) if return_outputs else loss

    def _log_rewards(self, mode: str, labels: torch.Tensor, rewards: torch.Tensor, logps: torch.Tensor) -> None:
        """TRL's rewards/* and logps/*: sums over every process divided by the example counts there."""
        gather, metrics = self.accelerator.gather_for_metrics, self._metrics[mode]
        sums = torch.stack([labels.sum(), (~labels).sum(), rewards[labels].nansum(), rewards[~labels].nansum(),
                            logps[labels].nansum(), logps[~labels].nansum()]).float()
        chosen, rejected, chosen_reward, rejected_reward, chosen_logps, rejected_logps = \
            gather(sums[None]).sum(0).tolist()
        if chosen:
            metrics["rewards/chosen"].append(chosen_reward / chosen)
            metrics["logps/chosen"].append(chosen_logps / chosen)
        if rejected:
            metrics["rewards/rejected"].append(rejected_reward / rejected)
            metrics["logps/rejected"].append(rejected_logps / rejected)
        if chosen and rejected:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation logs the same metrics through `_metrics`; there are no logits to return (none are built).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
