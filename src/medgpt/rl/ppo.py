"""Our RL trainer: the loop of InstructGPT / Ziegler et al. (PPO with a critic) and its critic-free variants
(GRPO, RLOO, REINFORCE++), composed from the pure functions of `ppo_core` and `advantages`.

One step: sample a batch of prompts -> generate `num_samples_per_prompt` replies each -> score the replies
(reward model + rule rewards; normalised, clipped, penalised when unfinished) -> log-probs of actor and reference,
values -> advantages (`advantage_estimator`) -> `ppo_epochs` passes of minibatch updates (clipped policy loss -
entropy bonus [+ KL term for GRPO], clipped value loss with its own optimizer group) -> KL coefficient update.
Every `eval_steps` the held-out prompts are answered and scored (`medgpt.rl.heldout`).

Data parallel: each process answers its own share of the prompts; gradients are averaged over processes
before every optimizer step (FSDP2 does it for sharded weights), scores are normalised and advantages whitened
over all of them, and logged numbers are global means.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from medgpt.metrics_files import METRICS_FILE, MetricsWriter
from medgpt.rl import advantages as estimators
from medgpt.rl import ppo_core as core
from medgpt.rl import sharding
from medgpt.rl.actor_critic import ActorCritic
from medgpt.rl.checkpoint import load_checkpoint, save_checkpoint
from medgpt.rl.distributed import average_gradients, broadcast_parameters, check_in_sync, clip_grad_norm, \
    global_mean, global_sum, rank, world_size
from medgpt.rl.experience import Experience, rollout_batch, select, trimmed
from medgpt.rl.heldout import HeldOutEvaluation
from medgpt.rl.ppo_config import PPOArguments
from medgpt.rl.prompts import Prompt, fit_prompt, prompt_batches
from medgpt.rl.rollouts import RolloutBackend
from medgpt.rl.scoring import RewardFunction, Replies, combine, shape_scores
from medgpt.serve.engine import SamplingParams

logger = logging.getLogger(__name__)

ROLLOUTS_FILE = "rollouts.jsonl"
FLAT_GROUPS_EXPLAINED = (
    "%d of %d prompt groups got the same reward for all %d replies: their advantages are 0, so they add no policy "
    "gradient (when every group is like that and kl_coef is 0, the loss is exactly 0: not a bug, nothing to learn "
    "from). Use a graded reward (answer_f1 rather than an exact match), raise temperature or "
    "num_samples_per_prompt, or use prompts the model sometimes gets right. Logged as zero_advantage_groups."
)


class PPOTrainer:
    """Owns the networks, the optimizer and the loop; `train()` runs (or resumes) the whole stage."""

    def __init__(self, network: ActorCritic, tokenizer, chat_format, rollouts: RolloutBackend,
                 rewards: list[RewardFunction], ppo: PPOArguments, args, prompts: list[Prompt],
                 eval_prompts: list[Prompt] | None = None):
        from accelerate import PartialState
        from transformers import get_scheduler

        self.network, self.tokenizer, self.chat = network, tokenizer, chat_format
        self.rollouts, self.rewards, self.ppo, self.args = rollouts, rewards, ppo, args
        self.prompts = prompts
        self.accelerator = PartialState()  # wait_for_everyone() for the shared final save
        self.engine = sharding.distributed_summary(sharding.requested(args) is not None)  # for train_results.json
        self.model = network.policy  # what save_final saves and samples from
        self.output = Path(args.output_dir)
        self.stop_ids = set(chat_format.stop_token_ids())
        self.prompt_ids, cuts = zip(*(fit_prompt(chat_format, p, ppo.max_prompt_length) for p in prompts))
        if any(cuts):
            logger.info("prompts over max_prompt_length %d: %d lost their oldest turns, %d the start of the question",
                        ppo.max_prompt_length, cuts.count("turns"), cuts.count("question"))
        self.group_size = ppo.num_samples_per_prompt
        self.batches_per_pass = len(prompts) // (ppo.rollout_batch_size * world_size())
        self.max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * self.batches_per_pass)
        rows = ppo.rollout_batch_size * self.group_size
        self.minibatches = rows // args.per_device_train_batch_size
        updates = self.max_steps * ppo.ppo_epochs * math.ceil(self.minibatches / args.gradient_accumulation_steps)
        groups = [{"params": [p for _, p in network.actor_named], "lr": args.learning_rate}]
        if network.critic_named:
            groups.append({"params": [p for _, p in network.critic_named],
                           "lr": ppo.critic_learning_rate or args.learning_rate})
        self.optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay,
                                           betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, args.get_warmup_steps(updates), updates,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        self.kl = core.kl_controller(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        self.score_moments = core.RunningMoments()
        self.step = 0
        self.sampling = SamplingParams(max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature,
                                       top_p=ppo.top_p, top_k=ppo.top_k)
        self.use_reference = ppo.kl_coef > 0 and network.has_reference
        self.heldout = None
        self.warned_flat_groups = False
        self.synced_step: int | None = None
        if eval_prompts and args.eval_steps:
            self.heldout = HeldOutEvaluation(self, eval_prompts)
        broadcast_parameters(network.trainable)  # every process starts from rank 0's initialisation

    def is_world_process_zero(self) -> bool:
        return rank() == 0

    def save_model(self, directory: str) -> None:
        self.network.save_actor(directory, write=self.is_world_process_zero())  # every process: gathers shards

    # ---------------------------------------------------------------------------------------- rollouts

    def batch_indices(self, step: int) -> list[int]:
        """This process's prompt indices for `step` (1-based): the same seeded order on every process, each
        taking its own slice; a new pass reshuffles."""
        per_step = self.ppo.rollout_batch_size * world_size()
        epoch = (step - 1) // self.batches_per_pass
        order = prompt_batches(list(range(len(self.prompts))), per_step, self.args.seed, epoch)
        chosen = order[(step - 1) % self.batches_per_pass]
        return chosen[rank() * self.ppo.rollout_batch_size:(rank() + 1) * self.ppo.rollout_batch_size]

    def sample(self, prompts: list[Prompt], prompt_ids: list[list[int]], params: SamplingParams) -> Replies:
        """Replies of the current policy (the actor adapter on) to each prompt, as the rewards see them."""
        self.network.use("default")
        if self.synced_step != self.step:  # a generation server gets the current weights once per step
            self.rollouts.sync(self.network.policy, self.step)
            self.synced_step = self.step
        responses = self.rollouts.generate_ids(prompt_ids, params)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        return Replies(prompts, prompt_ids, responses, texts)

    def score(self, replies: Replies) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(scores after shaping, valid replies, numbers for the log: `reward` is the raw weighted sum)."""
        raw, valid, parts = combine(self.rewards, replies)
        ended = torch.tensor([bool(r) and r[-1] in self.stop_ids for r in replies.ids], dtype=torch.float64)
        scores = shape_scores(raw, valid, ended, self.ppo, self.score_moments)
        kept = raw[valid] if valid.any() else torch.zeros(1, dtype=raw.dtype)
        parts.update(reward=kept.mean().item(), reward_std=kept.std().item() if len(kept) > 1 else 0.0,
                     score=scores[valid].mean().item() if valid.any() else 0.0,
                     no_eos_fraction=(1 - ended).mean().item())
        return scores.float(), valid, parts

    @torch.no_grad()
    def forward_rollouts(self, batch: dict, tokens: torch.Tensor, mask: torch.Tensor, reference: bool):
        """(actor log-probs, entropy, reference log-probs or None, values or None), all (B, R), a minibatch at a
        time, each trimmed to its own longest row."""
        temperature, size = self.ppo.temperature, self.args.per_device_train_batch_size
        logprobs, entropy = torch.zeros_like(mask), torch.zeros_like(mask)
        ref = torch.zeros_like(mask) if reference else None
        values = torch.zeros_like(mask) if self.network.has_critic else None
        for start in range(0, len(tokens), size):
            rows = slice(start, start + size)
            part, part_tokens, part_mask = trimmed(select(batch, rows), tokens[rows], mask[rows])
            length = part_tokens.shape[1]
            with self.network.autocast():
                lp, ent = self.network.policy_token_stats(part, part_tokens, part_mask, temperature, "value")
                logprobs[rows, :length], entropy[rows, :length] = lp, ent
                if ref is not None:
                    ref[rows, :length] = self.network.reference_logprobs(part, part_tokens, part_mask, temperature)
                if values is not None:
                    values[rows, :length] = self.network.values(part, length) * part_mask
        return logprobs, entropy, ref, values

    def make_experience(self, indices: list[int]) -> tuple[Experience, dict, list[dict]]:
        n = self.group_size
        prompts = [self.prompts[i] for i in indices for _ in range(n)]  # a prompt's replies are consecutive rows
        prompt_ids = [self.prompt_ids[i] for i in indices for _ in range(n)]
        started = time.perf_counter()
        replies = self.sample(prompts, prompt_ids, self.sampling)
        generated = time.perf_counter()
        scores, valid, stats = self.score(replies)
        scored = time.perf_counter()
        batch, tokens, mask = rollout_batch(prompt_ids, replies.ids, self.tokenizer.pad_token_id, self.args.device)
        mask = mask * valid.to(mask.device, mask.dtype)[:, None]  # replies no reward applies to do not train
        scores = scores.to(mask.device)
        logprobs, entropy, ref_logprobs, values = self.forward_rollouts(batch, tokens, mask, self.use_reference)
        stats.update(time_generate=generated - started, time_score=scored - generated,
                     time_forward=time.perf_counter() - scored)  # seconds: where a step's time goes
        kl = core.kl_penalty(logprobs, ref_logprobs, self.ppo.kl_estimator) * mask if ref_logprobs is not None \
            else torch.zeros_like(mask)
        if self.step == 0 and self.network.critic_from_reward_model:
            self.calibrate_value_head(values, scores, kl, mask)
        estimator = self.ppo.advantage_estimator
        advantages, returns = estimators.estimate(estimator, scores, kl, self.kl.value, mask, valid.to(mask.device),
                                                  values, self.ppo.gamma, self.ppo.lam, n)
        stats.update(entropy=core.masked_mean(entropy, mask).item(), response_length=mask.sum(-1).mean().item(),
                     kl_coef=self.kl.value)
        if ref_logprobs is not None:
            stats.update(kl=kl.sum(-1).mean().item(), non_score_reward=(-self.kl.value * kl).sum(-1).mean().item())
        if values is not None:
            stats.update(value_mean=core.masked_mean(values, mask).item(),
                         explained_variance=estimators.explained_variance(values, returns, mask))
        if estimator in estimators.GROUP_ESTIMATORS:
            flat = (advantages.abs().sum(-1).view(-1, n) == 0).all(-1)
            stats["zero_advantage_groups"] = flat.double().mean().item()
            if flat.any() and not self.warned_flat_groups and self.is_world_process_zero():
                logger.warning(FLAT_GROUPS_EXPLAINED, int(flat.sum()), len(flat), n)
                self.warned_flat_groups = True
        samples = [{"prompt": p.messages[-1].content, "response": r, "score": s}
                   for p, r, s in zip(prompts, replies.texts, scores.tolist())][: self.ppo.logged_samples]
        kept_ref = ref_logprobs if estimator == "grpo" else None  # GRPO's KL is a loss term: needs them again
        return Experience(batch, tokens, mask, logprobs, kept_ref, values, advantages, returns), stats, samples

    @torch.no_grad()
    def calibrate_value_head(self, values, scores, kl, mask) -> None:
        """Fit a value head copied from the reward model to this first batch's returns, once: it outputs raw
        reward-model scores of each prefix, the returns are shaped (weighted, normalised, clipped, penalised)
        scores. The affine map `scale * value + shift` with the least squared error over every trained token of
        every process (scale kept >= 0: the reward model's ordering is the prior worth keeping); so the critic
        starts no worse than a constant at the returns' mean, and better where the reward model's prefix scores
        already foresee the final one."""
        returns = estimators.returns_to_go(core.token_rewards(scores, kl, self.kl.value, mask), mask, self.ppo.gamma)
        v, g = values.double() * mask, returns.double()
        count, sv, sg, svv, svg = global_sum(torch.stack(
            [mask.sum(), v.sum(), g.sum(), (v * v).sum(), (v * g).sum()]).double()).tolist()
        count = max(count, 1.0)
        mean_v, mean_g = sv / count, sg / count
        variance = svv / count - mean_v ** 2
        scale = max((svg / count - mean_v * mean_g) / variance, 0.0) if variance > 1e-12 else 0.0
        shift = mean_g - scale * mean_v
        head = self.network.value_head
        head.weight.mul_(scale)
        head.bias.mul_(scale).add_(shift)
        values.mul_(scale).add_(shift * mask)
        logger.info("value head from the reward model fitted to the first returns: x %.4f %+.4f (explained "
                    "variance %.3f)", scale, shift, estimators.explained_variance(values, returns, mask))

    # ---------------------------------------------------------------------------------------- updates

    def minibatch_loss(self, part: Experience, scale: float, train_actor: bool) -> dict[str, torch.Tensor]:
        """Backpropagate the policy and value losses of one minibatch (x `scale`); return their numbers. Each
        role's backward runs right after its forward: activation checkpointing recomputes with its adapter."""
        out: dict[str, torch.Tensor] = {}
        mask, ppo = part.mask, self.ppo
        if train_actor:
            with self.network.autocast():
                logprobs, entropy = self.network.policy_token_stats(
                    part.batch, part.responses, mask, ppo.temperature, "grad" if ppo.entropy_coef else "none")
                pg_loss, pg_stats = core.policy_loss(logprobs, part.logprobs, part.advantages, mask, ppo.cliprange)
                loss = pg_loss
                if ppo.entropy_coef:
                    out["entropy_bonus"] = core.masked_mean(entropy, mask)
                    loss = loss - ppo.entropy_coef * out["entropy_bonus"]
                if part.ref_logprobs is not None:
                    out["kl_loss"] = core.kl_loss(logprobs, part.ref_logprobs, mask)
                    loss = loss + self.kl.value * out["kl_loss"]
            (loss * scale).backward()
            out.update(loss=loss, policy_loss=pg_loss, **pg_stats)
        if self.network.has_critic:
            with self.network.autocast():
                values = self.network.values(part.batch, part.responses.shape[1])
                vf_loss, vf_clipfrac = core.value_loss(values, part.values, part.returns, mask, ppo.cliprange_value)
            (ppo.vf_coef * vf_loss * scale).backward()
            out.update(value_loss=vf_loss, value_clipfrac=vf_clipfrac)
            out["loss"] = out.get("loss", 0.0) + ppo.vf_coef * vf_loss
        return {key: value.detach() for key, value in out.items()}

    def optimizer_step(self, train_actor: bool) -> None:
        groups = self.optimizer.param_groups if train_actor else self.optimizer.param_groups[1:]
        for group in groups:  # the actor and the critic each get their own gradient-norm clipping
            average_gradients(group["params"])
            if self.args.max_grad_norm:
                clip_grad_norm(group["params"], self.args.max_grad_norm)
        self.optimizer.step()  # parameters without a gradient (the actor during critic warm-up) stay as they are
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def update(self, exp: Experience, train_actor: bool = True) -> dict[str, float]:
        """`ppo_epochs` passes of minibatches of per_device_train_batch_size rollouts; an optimizer step per
        gradient_accumulation_steps minibatches, each weighted 1 / (minibatches in its group): a group cut
        short at the end of the pass counts as much as a full one."""
        size, accumulation = self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps
        totals: dict[str, float] = {}
        count = 0
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(len(exp.responses)).to(exp.mask.device)
            minibatches = [order[start:start + size] for start in range(0, len(order), size)]
            for first in range(0, len(minibatches), accumulation):
                group = minibatches[first:first + accumulation]
                for rows in group:
                    for key, value in self.minibatch_loss(exp.minibatch(rows), 1 / len(group), train_actor).items():
                        totals[key] = totals.get(key, 0.0) + value.item()
                    count += 1
                self.optimizer_step(train_actor)
        return {key: value / count for key, value in totals.items()}

    def train_step(self) -> tuple[dict[str, float], list[dict]]:
        self.network.train()
        exp, stats, samples = self.make_experience(self.batch_indices(self.step + 1))
        train_actor = self.step >= self.ppo.critic_warmup_steps
        started = time.perf_counter()
        stats.update(self.update(exp, train_actor))
        stats["time_update"] = time.perf_counter() - started
        self.step += 1
        names = sorted(stats)
        means = global_mean(torch.tensor([stats[n] for n in names], dtype=torch.float64)).tolist()
        stats = dict(zip(names, means))
        if train_actor and "kl" in stats:  # the coefficient follows the actor's KL, not a frozen actor's
            self.kl.update(stats["kl"], self.ppo.rollout_batch_size * self.group_size * world_size())
        stats["learning_rate"] = self.scheduler.get_last_lr()[0]
        return stats, samples

    # ---------------------------------------------------------------------------------------- the loop

    def train(self, resume: str | None = None) -> dict[str, float]:
        from transformers import TrainerState

        if resume:
            load_checkpoint(self, resume)
        state = TrainerState(global_step=self.step, is_world_process_zero=self.is_world_process_zero())
        writer = MetricsWriter(self.output / METRICS_FILE)
        writer.on_train_begin(self.args, state, None)  # drops rows an interrupted run logged after `step`
        self._trim_rollouts()
        if self.heldout is not None:
            self.heldout.begin(writer, state)
        totals: dict[str, float] = {}
        steps_run, last_kl = 0, None
        while self.step < self.max_steps:
            stats, samples = self.train_step()
            last_kl = stats.get("kl", last_kl)
            steps_run += 1
            state.global_step, state.epoch = self.step, self.step / max(self.batches_per_pass, 1)
            if self.heldout is not None and (self.step % self.args.eval_steps == 0 or self.step == self.max_steps):
                stats.update(self.heldout.evaluate())
            writer.on_log(self.args, state, None, logs=stats)
            self._log_samples(samples)
            for key in ("reward", "kl", "response_length"):
                if key in stats:
                    totals[key] = totals.get(key, 0.0) + stats[key]
            if self.step % max(self.args.logging_steps, 1) == 0 or self.step == self.max_steps:
                logger.info("rl step %d/%d: %s", self.step, self.max_steps, "  ".join(
                    f"{k} {stats[k]:.4g}" for k in ("reward", "kl", "entropy", "policy_loss", "value_loss",
                                                    "explained_variance", "clipfrac", "response_length") if k in stats))
            if self.args.save_strategy == "steps" and self.step % self.args.save_steps == 0:
                save_checkpoint(self)
        check_in_sync(self.network.trainable)
        results = {"global_step": self.step, "world_size": world_size(),
                   **{f"train_{key}": value / max(steps_run, 1) for key, value in totals.items()}}
        if last_kl is not None:  # the report holds the policy's final KL to its reference against the target
            results.update(final_kl=last_kl, target_kl=self.ppo.target_kl)
        if self.heldout is not None:
            results.update(self.heldout.final())
        return results

    def _log_samples(self, samples: list[dict]) -> None:
        if self.is_world_process_zero() and samples:
            with (self.output / ROLLOUTS_FILE).open("a", encoding="utf-8") as handle:
                for sample in samples:
                    handle.write(json.dumps({"step": self.step, **sample}, ensure_ascii=False) + "\n")

    def _trim_rollouts(self) -> None:
        path = self.output / ROLLOUTS_FILE
        if self.is_world_process_zero() and path.is_file():
            rows = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
