"""Our PPO trainer (RLHF): the loop of InstructGPT / Ziegler et al., composed from the pure functions of
`ppo_core`, readable in one sitting.

One step: sample a batch of prompts -> generate one reply each -> score the replies (reward model + rule
rewards; normalised, clipped, penalised when unfinished) -> log-probs of actor and reference, values ->
per-token KL penalty + score at the last token -> GAE -> whitened advantages -> `ppo_epochs` passes of
minibatch updates (clipped policy loss - entropy bonus, clipped value loss) -> KL coefficient update.

Data parallel: each process answers its own share of the prompts; gradients are averaged over processes
before every optimizer step, scores are normalised over all of them, and logged numbers are global means.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medgpt.report import METRICS_FILE, MetricsWriter
from medgpt.rl import ppo_core as core
from medgpt.rl.actor_critic import ActorCritic
from medgpt.rl.distributed import (
    average_gradients,
    broadcast_parameters,
    check_in_sync,
    gather,
    global_mean,
    rank,
    world_size,
)
from medgpt.rl.ppo_config import PPOArguments
from medgpt.rl.prompts import Prompt, prompt_batches
from medgpt.rl.rollouts import RolloutBackend
from medgpt.rl.trl_prompts import encode_conversation
from medgpt.serve.engine import SamplingParams
from medgpt.training.checkpoints import COMPLETE, checkpoints

logger = logging.getLogger(__name__)

ROLLOUTS_FILE = "rollouts.jsonl"
STATE_FILE = "ppo_state.json"
WEIGHTS_FILE = "trainable.safetensors"


@dataclass
class RewardFunction:
    """A named, weighted reward with TRL's signature (as in `medgpt.rl.rewards`): f(prompts, completions,
    completion_ids, reference, reference_kind, conversation) -> one float (or None: does not apply, counted
    as 0) per reply."""

    name: str
    weight: float
    fn: Callable[..., list[float | None]]

    def __call__(self, prompts: list[Prompt], replies: list[str], reply_ids: list[list[int]]) -> torch.Tensor:
        values = self.fn(prompts=[p.to_openai() for p in prompts], completions=replies, completion_ids=reply_ids,
                         reference=[p.reference for p in prompts], reference_kind=[p.reference_kind for p in prompts],
                         conversation=[encode_conversation(p.messages, p.tools) for p in prompts])
        if len(values) != len(replies):
            raise ValueError(f"reward {self.name} returned {len(values)} values for {len(replies)} replies")
        return torch.tensor([0.0 if v is None else float(v) for v in values], dtype=torch.float64)


@dataclass
class Experience:
    """One step's rollouts, all (B, R) over response positions unless noted."""

    batch: dict  # input_ids, attention_mask, position_ids: (B, P + R)
    responses: torch.Tensor  # token ids
    mask: torch.Tensor  # 1.0 on reply tokens
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """[left-padded prompt | right-padded reply] rows; positions count real tokens only, as in generation."""
    width, length = max(len(p) for p in prompts), max(len(r) for r in responses)
    ids = torch.full((len(prompts), width + length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids[row, width - len(prompt):width] = torch.tensor(prompt)
        ids[row, width:width + len(response)] = torch.tensor(response, dtype=torch.long)
        mask[row, width - len(prompt):width + len(response)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
    return batch, ids[:, width:].to(device), mask[:, width:].float().to(device)


def select(batch: dict, rows: torch.Tensor) -> dict:
    return {key: value[rows] for key, value in batch.items()}


# ------------------------------------------------------------------------------------------------ trainer


class PPOTrainer:
    """Owns the networks, the optimizer and the loop; `train()` runs (or resumes) the whole stage."""

    def __init__(self, network: ActorCritic, tokenizer, chat_format, rollouts: RolloutBackend,
                 rewards: list[RewardFunction], ppo: PPOArguments, args, prompts: list[Prompt]):
        from accelerate import PartialState

        self.network, self.tokenizer, self.chat = network, tokenizer, chat_format
        self.rollouts, self.rewards, self.ppo, self.args = rollouts, rewards, ppo, args
        self.prompts = prompts
        self.accelerator = PartialState()  # wait_for_everyone() for the shared final save
        self.model = network.policy  # what save_final saves and samples from
        self.output = Path(args.output_dir)
        self.stop_ids = set(chat_format.stop_token_ids())
        self.prompt_ids = [self._encode(p) for p in prompts]
        self.batches_per_pass = len(prompts) // (ppo.rollout_batch_size * world_size())
        passes = math.ceil(args.num_train_epochs * self.batches_per_pass)
        self.max_steps = args.max_steps if args.max_steps > 0 else passes
        self.minibatches = ppo.rollout_batch_size // args.per_device_train_batch_size
        updates = self.max_steps * ppo.ppo_epochs * math.ceil(self.minibatches / args.gradient_accumulation_steps)
        self.optimizer = torch.optim.AdamW(network.trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                           betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, args.get_warmup_steps(updates), updates,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        self.kl = core.kl_controller(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        self.score_moments = core.RunningMoments()
        self.step = 0
        self.sampling = SamplingParams(max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature,
                                       top_p=ppo.top_p, top_k=ppo.top_k)
        broadcast_parameters(network.trainable)  # every process starts from rank 0's initialisation

    def is_world_process_zero(self) -> bool:
        return rank() == 0

    def save_model(self, directory: str) -> None:
        if self.is_world_process_zero():
            self.network.save_actor(directory)

    def _encode(self, prompt: Prompt) -> list[int]:
        ids = self.chat.prompt_ids(prompt.messages, prompt.tools)
        return ids[-self.ppo.max_prompt_length:]  # the question is at the end: cut the oldest context

    def _autocast(self):
        device = self.args.device
        enabled = bool(self.args.bf16) and torch.device(device).type == "cuda"
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)

    # ---------------------------------------------------------------------------------------- rollouts

    def batch_indices(self, step: int) -> list[int]:
        """This process's prompt indices for `step` (1-based): the same seeded order on every process, each
        taking its own slice; a new pass reshuffles."""
        per_step = self.ppo.rollout_batch_size * world_size()
        epoch = (step - 1) // self.batches_per_pass
        order = prompt_batches(list(range(len(self.prompts))), per_step, self.args.seed, epoch)
        chosen = order[(step - 1) % self.batches_per_pass]
        return chosen[rank() * self.ppo.rollout_batch_size:(rank() + 1) * self.ppo.rollout_batch_size]

    def score(self, prompts: list[Prompt], responses: list[list[int]]) -> tuple[torch.Tensor, dict, list[str]]:
        """Scores after normalisation, clipping and the missing-EOS penalty, with the raw parts for the log."""
        replies = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        raw = torch.zeros(len(replies), dtype=torch.float64)
        parts = {}
        for reward in self.rewards:
            values = reward(prompts, replies, responses)
            parts[f"reward_{reward.name}"] = values.mean().item()
            raw += reward.weight * values
        everyone = gather(raw)  # normalise over all processes alike
        normalised = core.normalise_scores(everyone, self.ppo.reward_normalization, self.score_moments)
        mine = core.clip_scores(normalised, self.ppo.reward_clip)[rank() * len(raw):(rank() + 1) * len(raw)]
        ended = torch.tensor([bool(r) and r[-1] in self.stop_ids for r in responses], dtype=torch.float64)
        if self.ppo.missing_eos_penalty is not None:
            mine = mine - self.ppo.missing_eos_penalty * (1 - ended)
        parts.update(reward=raw.mean().item(), score=mine.mean().item(), no_eos_fraction=(1 - ended).mean().item())
        return mine.float(), parts, replies

    @torch.no_grad()
    def _forward_in_chunks(self, batch: dict, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(actor log-probs, reference log-probs, values) of the rollouts, a minibatch at a time."""
        out = ([], [], [])
        size = self.args.per_device_train_batch_size
        rows = len(batch["input_ids"])
        responses = batch["input_ids"][:, -length:]
        temperature = self.ppo.temperature
        for start in range(0, rows, size):
            part, tokens = select(batch, torch.arange(start, min(start + size, rows))), responses[start:start + size]
            with self._autocast():
                out[0].append(core.token_logprobs(self.network.policy_logits(part, length, temperature), tokens))
                out[1].append(core.token_logprobs(self.network.reference_logits(part, length, temperature), tokens))
                out[2].append(self.network.values(part, length))
        return tuple(torch.cat(parts) for parts in out)

    def make_experience(self, indices: list[int]) -> tuple[Experience, dict, list[dict]]:
        prompts = [self.prompts[i] for i in indices]
        prompt_ids = [self.prompt_ids[i] for i in indices]
        self.network.use("default")
        self.rollouts.sync(self.network.policy, self.step)
        responses = self.rollouts.generate_ids(prompt_ids, self.sampling)
        scores, stats, replies = self.score(prompts, responses)
        batch, tokens, mask = rollout_batch(prompt_ids, responses, self.tokenizer.pad_token_id, self.args.device)
        logprobs, ref_logprobs, values = self._forward_in_chunks(batch, tokens.shape[1])
        kl = core.kl_penalty(logprobs, ref_logprobs, self.ppo.kl_estimator) * mask
        rewards = core.token_rewards(scores.to(kl.device), kl, self.kl.value, mask)
        advantages, returns = core.gae(rewards, values, mask, self.ppo.gamma, self.ppo.lam)
        advantages = core.masked_whiten(advantages, mask)
        stats.update(kl=kl.sum(-1).mean().item(), kl_coef=self.kl.value,
                     non_score_reward=(-self.kl.value * kl).sum(-1).mean().item(),
                     response_length=mask.sum(-1).mean().item(), value_mean=core.masked_mean(values, mask).item())
        samples = [{"prompt": p.messages[-1].content, "response": r, "score": s}
                   for p, r, s in zip(prompts, replies, scores.tolist())][: self.ppo.logged_samples]
        return Experience(batch, tokens, mask, logprobs, values, advantages, returns), stats, samples

    # ---------------------------------------------------------------------------------------- updates

    def minibatch_loss(self, exp: Experience, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backpropagate the policy and value losses of `rows`; return their numbers."""
        part, length, mask = select(exp.batch, rows), exp.responses.shape[1], exp.mask[rows]
        scale = 1 / self.args.gradient_accumulation_steps
        with self._autocast():
            logits = self.network.policy_logits(part, length, self.ppo.temperature)
            logprobs = core.token_logprobs(logits, exp.responses[rows])
            pg_loss, pg_stats = core.policy_loss(logprobs, exp.logprobs[rows], exp.advantages[rows], mask,
                                                 self.ppo.cliprange)
            entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
        ((pg_loss - self.ppo.entropy_coef * entropy) * scale).backward()
        with self._autocast():
            values = self.network.values(part, length)
            vf_loss, vf_clipfrac = core.value_loss(values, exp.values[rows], exp.returns[rows], mask,
                                                   self.ppo.cliprange_value)
        (self.ppo.vf_coef * vf_loss * scale).backward()
        loss = pg_loss + self.ppo.vf_coef * vf_loss - self.ppo.entropy_coef * entropy
        return {"loss": loss.detach(), "policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                "entropy": entropy.detach(), "clipfrac": pg_stats["clipfrac"], "approx_kl": pg_stats["approx_kl"],
                "value_clipfrac": vf_clipfrac}

    def optimizer_step(self) -> None:
        average_gradients(self.network.trainable)
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.network.trainable, self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def update(self, exp: Experience) -> dict[str, float]:
        size, rows = self.args.per_device_train_batch_size, len(exp.responses)
        totals: dict[str, float] = {}
        count = 0
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(rows)
            for index, start in enumerate(range(0, rows, size)):
                for key, value in self.minibatch_loss(exp, order[start:start + size].to(exp.mask.device)).items():
                    totals[key] = totals.get(key, 0.0) + value.item()
                count += 1
                if (index + 1) % self.args.gradient_accumulation_steps == 0 or start + size >= rows:
                    self.optimizer_step()
        return {key: value / count for key, value in totals.items()}

    def train_step(self) -> tuple[dict[str, float], list[dict]]:
        self.network.policy.train()
        exp, stats, samples = self.make_experience(self.batch_indices(self.step + 1))
        stats.update(self.update(exp))
        self.step += 1
        names = sorted(stats)
        means = global_mean(torch.tensor([stats[n] for n in names], dtype=torch.float64)).tolist()
        stats = dict(zip(names, means))
        self.kl.update(stats["kl"], self.ppo.rollout_batch_size * world_size())
        stats["learning_rate"] = self.scheduler.get_last_lr()[0]
        return stats, samples

    # ---------------------------------------------------------------------------------------- the loop

    def train(self, resume: str | None = None) -> dict[str, float]:
        from transformers import TrainerState

        if resume:
            self.load_checkpoint(resume)
        state = TrainerState(global_step=self.step, is_world_process_zero=self.is_world_process_zero())
        writer = MetricsWriter(self.output / METRICS_FILE)
        writer.on_train_begin(self.args, state, None)  # drops rows an interrupted run logged after `step`
        self._trim_rollouts()
        totals: dict[str, float] = {}
        steps_run = 0
        while self.step < self.max_steps:
            stats, samples = self.train_step()
            steps_run += 1
            state.global_step, state.epoch = self.step, self.step / max(self.batches_per_pass, 1)
            writer.on_log(self.args, state, None, logs=stats)
            self._log_samples(samples)
            for key in ("reward", "kl", "response_length"):
                totals[key] = totals.get(key, 0.0) + stats[key]
            if self.step % max(self.args.logging_steps, 1) == 0 or self.step == self.max_steps:
                logger.info("ppo step %d/%d: reward %.3f  kl %.3f  entropy %.3f  policy_loss %.4f  value_loss %.4f  "
                            "clipfrac %.3f  length %.1f", self.step, self.max_steps, stats["reward"], stats["kl"],
                            stats["entropy"], stats["policy_loss"], stats["value_loss"], stats["clipfrac"],
                            stats["response_length"])
            if self.args.save_strategy == "steps" and self.step % self.args.save_steps == 0:
                self.save_checkpoint()
        check_in_sync(self.network.trainable)
        return {"global_step": self.step, "world_size": world_size(),
                **{f"train_{key}": value / max(steps_run, 1) for key, value in totals.items()}}

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

    # ---------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """checkpoint-N: trainable weights, optimizer, scheduler, KL and score state, every process's RNG; the
        completion marker is written last, so a checkpoint cut short is never resumed from."""
        path = self.output / f"checkpoint-{self.step}"
        if self.is_world_process_zero():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            save_file(self.network.trainable_state(), str(path / WEIGHTS_FILE))
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
            moments = self.score_moments
            state = {"step": self.step, "kl_controller": self.kl.state_dict(),
                     "score_moments": {"mean": moments.mean, "var": moments.var, "count": moments.count}}
            (path / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        self.accelerator.wait_for_everyone()
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   path / f"rng_state_{rank()}.pth")
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            (path / COMPLETE).write_text(json.dumps({"global_step": self.step}), encoding="utf-8")
            self._rotate_checkpoints()
        return path

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        complete = [path for _, path, done in checkpoints(self.output) if done]
        for path in complete[: max(len(complete) - limit, 0)] if limit else []:
            shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        self.network.load_trainable_state(load_file(str(path / WEIGHTS_FILE)))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        self.step = state["step"]
        self.kl.load_state_dict(state["kl_controller"])
        self.score_moments = core.RunningMoments(**state["score_moments"])
        rng_file = path / f"rng_state_{rank()}.pth"
        if not rng_file.is_file():
            raise ValueError(f"{path} has no {rng_file.name}: resume with as many processes as the run had")
        rng = torch.load(rng_file, weights_only=False)  # our own file: python/numpy RNG states are pickled
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        logger.info("resumed PPO at step %d from %s", self.step, path)
