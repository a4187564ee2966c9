"""Held-out evaluation during RL: prompts the policy never trains on, answered every `eval_steps` and scored.

Each evaluation samples one reply per held-out prompt as training does (same temperature and top-p, and the same
seed every time, so successive evaluations differ by the policy, not by the dice; the training RNG is left as
it was) and logs `eval_reward` (the weighted sum of the rewards, `eval_reward_<name>` each), `eval_kl` (KL to the
reference per reply, when there is a reference) and `eval_response_length`. An evaluation before the first step
(step 0) gives the start. At the end, greedy replies of the final policy are compared with greedy replies of the
start policy (made before step 1, kept in `eval_start_replies*.jsonl` for a resume) by the reward model — the
very model the policy was trained against, which favours its own optimum: `eval_win_rate_vs_start` (ties count
half), with wins, losses and ties.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import torch

from medgpt.rl import ppo_core as core
from medgpt.rl.distributed import global_sum, rank, world_size
from medgpt.rl.experience import rollout_batch
from medgpt.rl.prompts import fit_prompt
from medgpt.rl.scoring import Replies

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 7919  # the held-out replies' seed: args.seed + this, the same at every evaluation


class HeldOutEvaluation:
    def __init__(self, trainer, prompts):
        self.trainer = trainer
        per_rank = -(-len(prompts) // world_size())
        # Every process evaluates as many prompts (sharded forwards must run in step); repeats count 0.
        mine = [prompts[(rank() + world_size() * i) % len(prompts)] for i in range(per_rank)]
        self.weights = torch.tensor([float(rank() + world_size() * i < len(prompts)) for i in range(per_rank)],
                                    dtype=torch.float64)
        self.prompts = mine
        self.prompt_ids = [fit_prompt(trainer.chat, p, trainer.ppo.max_prompt_length)[0] for p in mine]
        self.greedy = replace(trainer.sampling, temperature=0.0)
        self.start_file = trainer.output / f"eval_start_replies_rank{rank()}.jsonl"
        self.start: list[list[int]] | None = None

    def begin(self, writer, state) -> None:
        """Before step 1 of a fresh run: evaluate the start policy and keep its greedy replies."""
        if self.trainer.step == 0:
            writer.on_log(self.trainer.args, state, None, logs=self.evaluate())
            self.start = self._replies(self.greedy).ids
            self.start_file.write_text("".join(json.dumps(ids) + "\n" for ids in self.start), encoding="utf-8")
        elif self.start_file.is_file():
            self.start = [json.loads(line) for line in self.start_file.read_text(encoding="utf-8").splitlines()]

    def _replies(self, params) -> Replies:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.trainer.args.seed + EVAL_SEED_OFFSET)
            return self.trainer.sample(self.prompts, self.prompt_ids, params)

    def _mean(self, values: torch.Tensor) -> float:
        """The mean over every process's held-out prompts (repeats left out)."""
        return self._ratio(values, torch.ones_like(self.weights, dtype=torch.bool))

    def _ratio(self, values: torch.Tensor, where: torch.Tensor) -> float:
        """The mean of `values` over the prompts `where` is true, over every process."""
        weights = self.weights * where.double().cpu()
        totals = global_sum(torch.stack([(values.double().cpu() * weights).sum(), weights.sum()]))
        return (totals[0] / totals[1].clamp(min=1e-12)).item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        trainer, network = self.trainer, self.trainer.network
        replies = self._replies(trainer.sampling)
        raw = torch.zeros(len(replies.ids), dtype=torch.float64)
        valid = torch.zeros(len(replies.ids), dtype=torch.bool)
        out = {}
        for reward in trainer.rewards:
            values = reward(replies)
            applies = ~values.isnan()
            out[f"eval_reward_{reward.name}"] = self._ratio(values.nan_to_num(0.0), applies)
            raw += reward.weight * values.nan_to_num(0.0)
            valid |= applies
        out.update(eval_reward=self._ratio(raw, valid),
                   eval_response_length=self._mean(torch.tensor([float(len(r)) for r in replies.ids])))
        if network.has_reference:
            batch, tokens, mask = rollout_batch(self.prompt_ids, replies.ids, trainer.tokenizer.pad_token_id,
                                                trainer.args.device)
            logprobs, _, ref, _ = trainer.forward_rollouts(batch, tokens, mask, reference=True)
            kl = core.kl_penalty(logprobs, ref, trainer.ppo.kl_estimator) * mask
            out["eval_kl"] = self._mean(kl.sum(-1))
        return out

    @torch.no_grad()
    def final(self) -> dict:
        """The reward model's win rate of the final policy's greedy replies over the start policy's."""
        if self.start is None:
            logger.warning("no start replies (%s missing): no win rate over the start policy", self.start_file)
            return {}
        trainer = self.trainer
        judges = [r for r in trainer.rewards if r.name == "reward_model"] or trainer.rewards
        end = self._replies(self.greedy)
        start = Replies(self.prompts, self.prompt_ids, self.start,
                        [trainer.tokenizer.decode(r, skip_special_tokens=True).strip() for r in self.start])
        end_score = sum(j.weight * j(end).nan_to_num(0.0) for j in judges)
        start_score = sum(j.weight * j(start).nan_to_num(0.0) for j in judges)
        w = self.weights
        wins, losses, ties = global_sum(torch.stack([((end_score > start_score) * w).sum(),
                                                     ((end_score < start_score) * w).sum(),
                                                     ((end_score == start_score) * w).sum()])).tolist()
        total = max(wins + losses + ties, 1.0)
        judge = "reward_model (trained against)" if judges[0].name == "reward_model" else "+".join(
            j.name for j in judges)
        logger.info("held-out win rate over the start policy: %.3f (%d wins, %d losses, %d ties; judge %s)",
                    (wins + ties / 2) / total, wins, losses, ties, judge)
        return {"eval_win_rate_vs_start": (wins + ties / 2) / total, "eval_wins": int(wins),
                "eval_losses": int(losses), "eval_ties": int(ties), "eval_win_judge": judge,
                "eval_mean_score_start": self._mean(start_score), "eval_mean_score_end": self._mean(end_score)}
