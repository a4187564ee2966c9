"""Stage 4, RLHF with PPO: the SFT policy answers prompts, the reward model (and optional rule rewards) score
the answers, and our PPO trainer (`medgpt.rl.ppo`) updates the policy on a KL leash to where it started.

Prompts come from any conversation, QA, MCQ or preference file (`medgpt.rl.prompts`), so SFT and RM data are
reused as they are. Networks: see `medgpt.rl.actor_critic` (LoRA: one base with actor and critic adapters).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import torch
from transformers import TrainingArguments

from medgpt.config import OWN_SECTIONS, ConfigError, RunConfig
from medgpt.data.templates import ChatFormat
from medgpt.models.adapters import attach_adapter, count_parameters, freeze_layers, start_from_adapter
from medgpt.models.lean import use_lean_activations
from medgpt.models.load import load_model, load_tokenizer
from medgpt.report import METRICS_FILE
from medgpt.rl import rewards
from medgpt.rl.actor_critic import ActorCritic
from medgpt.rl.distributed import rank
from medgpt.rl.ppo import ROLLOUTS_FILE, PPOTrainer, RewardFunction
from medgpt.rl.ppo_config import TRAINING_OPTIONS, PPOArguments
from medgpt.rl.prompts import load_prompts
from medgpt.rl.rollouts import EngineRollouts
from medgpt.serve.engine import GenerationEngine
from medgpt.stages import Stage, register
from medgpt.training.recipe import (
    TrainingJob,
    add_new_tokens,
    begin_run,
    datasets_sources,
    resize_for_tokenizer,
    save_final,
    start_logs,
)

logger = logging.getLogger(__name__)

PLOTS = ((("reward", "score", "kl"), "ppo.png", "mean reward, score after shaping, KL to the reference"),
         (("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl"), "ppo_losses.png", "PPO losses"))


def check_options(config: RunConfig) -> list[str]:
    """Refuse what PPO cannot honour before anything loads; return the reward names."""
    ppo, args = config.extra(PPOArguments), config.training
    own = {f.name for cls in (*OWN_SECTIONS, PPOArguments) for f in dataclasses.fields(cls)}
    upstream = {f.name for f in dataclasses.fields(TrainingArguments)}
    ignored = sorted(k for k in config.given if k in upstream and k not in own and k not in TRAINING_OPTIONS)
    if ignored:
        raise ConfigError(f"ppo runs its own loop and does not use {', '.join(ignored)}; it reads only "
                          f"{', '.join(TRAINING_OPTIONS)} of the trainer options")
    if ppo.rollout_batch_size % args.per_device_train_batch_size:
        raise ConfigError(f"rollout_batch_size {ppo.rollout_batch_size} is not a multiple of "
                          f"per_device_train_batch_size {args.per_device_train_batch_size} (the PPO minibatch)")
    if ppo.temperature <= 0:
        raise ConfigError("temperature must be > 0: PPO learns from the policy's own samples, greedy replies are not")
    if ppo.generation_backend == "vllm" and not config.adapter.use_peft:
        raise ConfigError("generation_backend vllm syncs a LoRA adapter each step: train LoRA (use_peft: true) or "
                          "generate with hf")
    if args.save_strategy not in ("steps", "no"):
        raise ConfigError(f"save_strategy {args.save_strategy}: ppo saves by steps (save_steps) or not at all (no)")
    if args.report_to:
        raise ConfigError(f"ppo logs to metrics.jsonl (and plots) only: set report_to: none, not {args.report_to}")
    if args.fp16:
        raise ConfigError("fp16 without loss scaling overflows in PPO: use bf16 (GPU) or fp32")
    names = ppo.reward_funcs or (["reward_model"] if ppo.reward_model_name_or_path else [])
    if not names:
        raise ConfigError("PPO needs a reward: set reward_model_name_or_path (a `medgpt rm` output) and/or reward_funcs")
    unknown = [n for n in names if n not in rewards.BUILT_IN and n != "reward_model" and ":" not in n]
    if unknown:
        raise ConfigError(f"reward_funcs {', '.join(unknown)}: not one of {', '.join(rewards.BUILT_IN)}, "
                          "reward_model, or module:function / file.py:function")
    if ("reward_model" in names) != bool(ppo.reward_model_name_or_path):
        raise ConfigError("reward_model in reward_funcs and reward_model_name_or_path go together: give both or neither")
    if ppo.reward_weights is not None and len(ppo.reward_weights) != len(names):
        raise ConfigError(f"reward_weights has {len(ppo.reward_weights)} values for {len(names)} rewards "
                          f"({', '.join(names)}): give one weight per reward")
    return names


def reward_functions(config: RunConfig, names: list[str]) -> list[RewardFunction]:
    """The weighted rewards; the reward model is loaded here, a user's function imported here."""
    ppo = config.extra(PPOArguments)
    weights = [float(w) for w in ppo.reward_weights] if ppo.reward_weights is not None else [1.0] * len(names)
    made = {"length_penalty": functools.partial(rewards.length_penalty, start=ppo.max_new_tokens // 2,
                                                limit=ppo.max_new_tokens)}
    functions = []
    for name, weight in zip(names, weights):
        if name == "reward_model":
            from medgpt.models.reward import RewardModelScorer

            scorer = RewardModelScorer.load(ppo.reward_model_name_or_path, torch_dtype=config.model.torch_dtype,
                                            trust_remote_code=config.model.trust_remote_code,
                                            batch_size=ppo.reward_model_batch_size)
            function = rewards.RewardModelReward(scorer)
        elif ":" in name:
            logger.warning("reward function %s: importing and running your code", name)
            function = rewards.load_user_function(name)
        else:
            function = made.get(name) or rewards.BUILT_IN[name]
        functions.append(RewardFunction(name.rpartition(":")[2], weight, function))  # metrics: reward_<function>
    return functions


def prepare_policy(config: RunConfig, tokenizer, context_length: int):
    """The start policy: LoRA on the (SFT) model, continuing an SFT adapter when given one, or full weights."""
    from transformers import set_seed

    set_seed(config.training.seed)  # adapters and the value head initialise alike on every process
    model = load_model(config.model, tokenizer, context_length=context_length)
    vocabulary_changed = resize_for_tokenizer(model, tokenizer)
    use_lean_activations(model)
    if config.adapter.use_peft:
        extra = ["embed_tokens", "lm_head"] if vocabulary_changed else None
        return attach_adapter(model, config.adapter, "CAUSAL_LM", extra, config.model.gradient_checkpointing)
    freeze_layers(model, config.adapter.freeze_trainable_layers)
    return model


def rollout_backend(config: RunConfig, network: ActorCritic, tokenizer, chat: ChatFormat):
    ppo = config.extra(PPOArguments)
    if ppo.generation_backend == "vllm":
        from medgpt.serve.vllm_client import VLLMRollouts

        sync_dir = ppo.vllm_sync_dir or str(Path(config.training.output_dir) / "vllm")
        return VLLMRollouts(ppo.vllm_server_url, chat.stop_token_ids(), sync_dir, ppo.vllm_model_name)
    engine = GenerationEngine(network.policy, tokenizer, chat)
    return EngineRollouts(engine, ppo.generation_batch_size or ppo.rollout_batch_size)


def setup(config: RunConfig):
    """Everything up to a ready trainer: (trainer, job, checkpoint to resume or None)."""
    ppo, args = config.extra(PPOArguments), config.training
    names = check_options(config)
    _ = args.device  # joins the process group under torchrun before anything asks for ranks
    train, evaluation = load_prompts(config.data, args.seed)  # validated before any model loads
    per_step = ppo.rollout_batch_size * args.world_size
    if len(train) < per_step:
        raise ConfigError(f"{len(train)} training prompts but a step needs {per_step} (rollout_batch_size x "
                          "processes): lower rollout_batch_size or add prompts")
    start_adapter = start_from_adapter(config)
    resume = begin_run(config)
    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_tokens_file)
    chat = ChatFormat(tokenizer, config.run.template)
    reward_funcs = reward_functions(config, names)
    policy = prepare_policy(config, tokenizer, ppo.max_prompt_length + ppo.max_new_tokens)
    network = ActorCritic.build(policy, config.adapter, config.adapter.use_peft, reference_adapter_path=start_adapter)
    quantised = config.model.load_in_4bit or config.model.load_in_8bit  # already placed by load_model
    (network.value_head if quantised else network).to(args.device)
    trainable, total = count_parameters(network)
    logger.info("trainable parameters (actor + critic): %s of %s", f"{trainable:,}", f"{total:,}")
    start_logs(config, resume, logs=(METRICS_FILE, ROLLOUTS_FILE))
    trainer = PPOTrainer(network, tokenizer, chat, rollout_backend(config, network, tokenizer, chat), reward_funcs,
                         ppo, args, train)
    torch.manual_seed(args.seed + rank())  # processes sample different replies (a resume restores each RNG)
    job = TrainingJob(config, tokenizer, chat, train, evaluation, data_sources=datasets_sources(config),
                      stats={"prompts": len(train), "reward_funcs": names},
                      sample_prompts=[p.messages for p in (evaluation or train)[:3]])
    return trainer, job, resume


def run(config: RunConfig) -> dict:
    trainer, job, resume = setup(config)
    metrics = trainer.train(resume)
    metrics.update(job.stats)
    trainer.network.use("default")  # the samples are the actor's
    save_final(trainer, job, metrics, plots=PLOTS)
    return metrics


register(Stage(
    name="ppo",
    summary="RLHF with PPO against a reward model (our trainer: actor and critic adapters on one base, KL leash)",
    run=run,
    training_class=TrainingArguments,
    extra_classes=(PPOArguments,),
    data_kind="conversation",
))
