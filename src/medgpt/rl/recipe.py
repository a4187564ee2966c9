"""The recipe of the RL stages (ppo, grpo, rloo): options checked, prompts read, policy and roles built, rewards
assembled, our trainer (`medgpt.rl.ppo`) run and the policy saved as every stage saves its model.

Prompts come from any conversation, QA, MCQ or preference file (`medgpt.rl.prompts`), so SFT and RM data are
reused as they are. Networks: see `medgpt.rl.actor_critic` (LoRA: one base with actor, critic, reference and
reward adapters). The stages differ only in their option defaults (`medgpt.rl.ppo_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import torch
from transformers import TrainingArguments

from medgpt.arguments import ModelArguments
from medgpt.config import OWN_SECTIONS, ConfigError, RunConfig
from medgpt.data.templates import ChatFormat
from medgpt.models.adapters import attach_adapter, count_parameters, freeze_layers, start_from_adapter
from medgpt.models.lean import use_lean_activations
from medgpt.models.load import load_model, load_tokenizer
from medgpt.metrics_files import METRICS_FILE
from medgpt.rl import advantages, rewards, sharding
from medgpt.rl.actor_critic import ActorCritic
from medgpt.rl.distributed import rank
from medgpt.rl.ppo import ROLLOUTS_FILE, PPOTrainer
from medgpt.rl.ppo_config import TRAINING_OPTIONS, PPOArguments
from medgpt.rl.prompts import load_prompts
from medgpt.rl.reward_adapter import AdapterRewardScorer, ModelReward, RewardAdapter
from medgpt.rl.rollouts import EngineRollouts
from medgpt.rl.scoring import RewardFunction, rule_reward
from medgpt.serve.engine import GenerationEngine, saved_template_name
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

def plots(stage: str) -> tuple:
    """(metrics keys, file name, title) of the pictures an RL stage leaves: `<stage>.png` and two more."""
    return ((("reward", "score", "kl"), f"{stage}.png", "mean reward, score after shaping, KL to the reference"),
            (("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "explained_variance"),
             f"{stage}_losses.png", "losses, entropy, clipping, critic fit"),
            (("eval_reward", "eval_kl", "eval_response_length"), f"{stage}_eval.png", "held-out prompts"))
CRITIC_OPTIONS = ("lam", "vf_coef", "cliprange_value", "critic_learning_rate", "critic_warmup_steps", "critic_init")


def options_of(config: RunConfig) -> PPOArguments:
    """This stage's RL options (PPOArguments, or a preset's subclass of it)."""
    return next(v for v in config.extras.values() if isinstance(v, PPOArguments))


def check_options(config: RunConfig) -> list[str]:
    """Refuse what the loop cannot honour before anything loads; return the reward names."""
    ppo, args, given = options_of(config), config.training, config.given
    own = {f.name for cls in (*OWN_SECTIONS, type(ppo)) for f in dataclasses.fields(cls)}
    upstream = {f.name for f in dataclasses.fields(TrainingArguments)}
    ignored = sorted(k for k in given if k in upstream and k not in own and k not in TRAINING_OPTIONS)
    if ignored:
        raise ConfigError(f"{config.stage} runs its own loop and does not use {', '.join(ignored)}; it reads only "
                          f"{', '.join(TRAINING_OPTIONS)} of the trainer options")
    rows = ppo.rollout_batch_size * ppo.num_samples_per_prompt
    if rows % args.per_device_train_batch_size:
        raise ConfigError(f"rollout_batch_size x num_samples_per_prompt = {rows} is not a multiple of "
                          f"per_device_train_batch_size {args.per_device_train_batch_size} (the minibatch)")
    if ppo.temperature <= 0:
        raise ConfigError("temperature must be > 0: RL learns from the policy's own samples, greedy replies are not")
    if ppo.sample_prompts < 0:
        raise ConfigError(f"sample_prompts {ppo.sample_prompts}: the number of held-out prompts answered at the end "
                          "(0 = none)")
    if "sample_prompts" in given and ppo.sample_prompts and sharding.requested(args) is not None:
        raise ConfigError("sample_prompts under sharding: rank 0 alone would generate while the others hold its "
                          "weights' shards; set sample_prompts: 0 (the default skips them)")
    estimator = ppo.advantage_estimator
    if estimator in advantages.GROUP_ESTIMATORS and ppo.num_samples_per_prompt < 2:
        raise ConfigError(f"advantage_estimator {estimator} compares a prompt's replies: set num_samples_per_prompt "
                          ">= 2 (4-16 is usual)")
    if estimator not in advantages.CRITIC_ESTIMATORS:
        unused = [k for k in CRITIC_OPTIONS if k in given]
        if unused:
            raise ConfigError(f"advantage_estimator {estimator} trains no critic: drop {', '.join(unused)} (or use gae)")
    if "gamma" in given and estimator in advantages.GROUP_ESTIMATORS:
        raise ConfigError(f"advantage_estimator {estimator} scores whole replies: gamma does not apply, drop it")
    if ppo.target_kl is not None and ppo.kl_coef <= 0:
        raise ConfigError("target_kl adapts kl_coef multiplicatively and cannot move it from 0: set kl_coef > 0")
    if "kl_estimator" in given and ppo.kl_coef <= 0:
        raise ConfigError("kl_estimator without a KL penalty (kl_coef 0): drop it or set kl_coef")
    if ppo.generation_backend == "vllm" and not config.adapter.use_peft:
        raise ConfigError("generation_backend vllm syncs a LoRA adapter each step: train LoRA (use_peft: true) or "
                          "generate with hf")
    if args.save_strategy not in ("steps", "no"):
        raise ConfigError(f"save_strategy {args.save_strategy}: {config.stage} saves by steps (save_steps) or not at "
                          "all (no)")
    if args.report_to:
        raise ConfigError(f"{config.stage} logs to metrics.jsonl (and plots) only: set report_to: none, not "
                          f"{args.report_to}")
    if args.fp16:
        raise ConfigError("fp16 without loss scaling overflows in RL: use bf16 or fp32")
    if sharding.requested(args) is not None and config.adapter.use_peft:
        raise ConfigError("FSDP2 shards full-parameter RL (use_peft: false); LoRA RL runs data parallel "
                          "(torchrun without fsdp): the base is frozen and the adapters are small")
    if args.eval_steps is not None and args.eval_steps <= 0:
        raise ConfigError(f"eval_steps {args.eval_steps}: give a positive number of steps (or leave it unset)")
    names = ppo.reward_funcs or (["reward_model"] if ppo.reward_model_name_or_path else list(ppo.DEFAULT_REWARDS))
    if not names:
        raise ConfigError(f"{config.stage} needs a reward: set reward_model_name_or_path (a `medgpt rm` output) "
                          "and/or reward_funcs")
    unknown = [n for n in names if n not in rewards.BUILT_IN and n != "reward_model" and ":" not in n]
    if unknown:
        raise ConfigError(f"reward_funcs {', '.join(unknown)}: not one of {', '.join(rewards.BUILT_IN)}, "
                          "reward_model, or module:function / file.py:function")
    if ("reward_model" in names) != bool(ppo.reward_model_name_or_path):
        # given both or neither: a path without reward_model in the list would be loaded and never used
        raise ConfigError("reward_model in reward_funcs and reward_model_name_or_path go together: give both or neither")
    if ppo.reward_weights is not None and len(ppo.reward_weights) != len(names):
        raise ConfigError(f"reward_weights has {len(ppo.reward_weights)} values for {len(names)} rewards "
                          f"({', '.join(names)}): give one weight per reward")
    for option, reward in (("format_pattern", "format_reward"), ("length_penalty_start", "length_penalty")):
        if option in given and reward not in names:
            raise ConfigError(f"{option} is for the {reward} reward, which reward_funcs does not include")
    start = ppo.length_penalty_start
    if start is not None and not 0 <= start < ppo.max_new_tokens:
        raise ConfigError(f"length_penalty_start {start} must be in [0, max_new_tokens={ppo.max_new_tokens})")
    if ppo.critic_init == "reward_model" and "reward_model" not in names:
        raise ConfigError("critic_init reward_model needs reward_model_name_or_path")
    return names


def rule_functions(config: RunConfig, names: list[str]) -> dict:
    """name -> TRL-signature callable for every reward but the reward model (a user's function is imported here)."""
    ppo = options_of(config)
    start = ppo.length_penalty_start if ppo.length_penalty_start is not None else ppo.max_new_tokens // 2
    made = {"length_penalty": functools.partial(rewards.length_penalty, start=start, limit=ppo.max_new_tokens),
            "format_reward": functools.partial(rewards.format_reward, pattern=ppo.format_pattern)}
    functions = {}
    for name in names:
        if name == "reward_model":
            continue
        if ":" in name:
            logger.warning("reward function %s: importing and running your code", name)
            functions[name] = rewards.load_user_function(name)
        else:
            functions[name] = made.get(name) or rewards.BUILT_IN[name]
    return functions


def reward_scorer(config: RunConfig, network: ActorCritic, shared: RewardAdapter | None):
    """The reward model: the adapter mounted on the policy's base, or a model of its own (`RewardModelScorer`)."""
    ppo = options_of(config)
    path = ppo.reward_model_name_or_path
    if shared is not None:
        tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(shared.path),
                                                  trust_remote_code=config.model.trust_remote_code))
        chat = ChatFormat(tokenizer, saved_template_name(shared.path))
        return AdapterRewardScorer(network, tokenizer, chat, ppo.reward_model_batch_size)
    from medgpt.models.reward import RewardModelScorer

    return RewardModelScorer.load(path, torch_dtype=config.model.torch_dtype,
                                  trust_remote_code=config.model.trust_remote_code,
                                  batch_size=ppo.reward_model_batch_size)


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


def build_network(config: RunConfig, policy, tokenizer, names: list[str], start_adapter: str | None,
                  evaluating: bool) -> tuple[ActorCritic, RewardAdapter | None]:
    ppo = options_of(config)
    shared = None
    if "reward_model" in names:
        shared, why = RewardAdapter.find(ppo.reward_model_name_or_path, config.model.model_name_or_path, tokenizer)
        if shared is not None:
            logger.info("reward model %s is a LoRA adapter of the policy's base (%s): mounted on it, no second base",
                        ppo.reward_model_name_or_path, why)
        else:
            logger.info("reward model %s loads on its own: %s", ppo.reward_model_name_or_path, why)
    critic = ppo.advantage_estimator in advantages.CRITIC_ESTIMATORS
    critic_init = ppo.critic_init or ("reward_model" if shared is not None else "policy")
    if critic_init == "reward_model" and shared is None:
        raise ConfigError(f"critic_init reward_model: the reward model is not a LoRA adapter of the policy's base "
                          f"({why}); use critic_init policy or zero")
    network = ActorCritic.build(policy, config.adapter, config.adapter.use_peft, start_adapter, critic=critic,
                                critic_init=critic_init, reward_adapter=shared,
                                reference=ppo.kl_coef > 0 or (evaluating and config.adapter.use_peft),
                                bf16=bool(config.training.bf16))
    if critic:
        logger.info("critic starts from %s", {"reward_model": "the reward model (adapter and score head)",
                                              "policy": "the start policy's features, zero head",
                                              "zero": "the bare base, zero head"}[critic_init])
    return network, shared


def rollout_backend(config: RunConfig, network: ActorCritic, tokenizer, chat: ChatFormat):
    ppo = options_of(config)
    if ppo.generation_backend == "vllm":
        from medgpt.serve.vllm_client import VLLMRollouts

        sync_dir = ppo.vllm_sync_dir or str(Path(config.training.output_dir) / "vllm")
        return VLLMRollouts(ppo.vllm_server_url, chat.stop_token_ids(), sync_dir, ppo.vllm_model_name)
    engine = GenerationEngine(network.policy, tokenizer, chat)
    rows = ppo.generation_batch_size or ppo.rollout_batch_size * ppo.num_samples_per_prompt
    return EngineRollouts(engine, rows, network.generation_context)


def memory_stats(network: ActorCritic, scorer) -> dict:
    """The weights every role holds together, against one base model (the reward model's own copy included)."""
    held, base = network.weight_bytes()
    if not isinstance(scorer, AdapterRewardScorer) and scorer is not None:
        held += sum(p.numel() * p.element_size() for p in scorer.model.parameters())
    return {"weights_gb": round(held / 1e9, 4), "roles_memory_over_base": round(held / base, 4)}


def setup(config: RunConfig):
    """Everything up to a ready trainer: (trainer, job, checkpoint to resume or None)."""
    ppo, args = options_of(config), config.training
    names = check_options(config)
    _ = args.device  # joins the process group under torchrun before anything asks for ranks
    train, evaluation = load_prompts(config.data, args.seed)  # validated before any model loads
    per_step = ppo.rollout_batch_size * args.world_size
    if len(train) < per_step:
        raise ConfigError(f"{len(train)} training prompts but a step needs {per_step} (rollout_batch_size x "
                          "processes): lower rollout_batch_size or add prompts")
    if args.eval_steps and not evaluation:
        raise ConfigError("eval_steps is set but there are no held-out prompts: set validation_file_dir or "
                          "validation_split_percentage")
    functions = rule_functions(config, names)  # a user's function fails here, before any model loads
    start_adapter = start_from_adapter(config)
    resume = begin_run(config)
    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_tokens_file)
    chat = ChatFormat(tokenizer, config.run.template)
    policy = prepare_policy(config, tokenizer, ppo.max_prompt_length + ppo.max_new_tokens)
    network, shared = build_network(config, policy, tokenizer, names, start_adapter, bool(args.eval_steps))
    quantised = config.model.load_in_4bit or config.model.load_in_8bit  # already placed by load_model
    (network.value_head if quantised and network.value_head is not None else network).to(args.device)
    scorer = reward_scorer(config, network, shared) if "reward_model" in names else None
    weights = [float(w) for w in ppo.reward_weights] if ppo.reward_weights is not None else [1.0] * len(names)
    reward_funcs = [RewardFunction("reward_model", w, ModelReward(scorer, chat)) if n == "reward_model"
                    else RewardFunction(n.rpartition(":")[2], w, rule_reward(functions[n]))  # metrics: reward_<fn>
                    for n, w in zip(names, weights)]
    trainable, total = count_parameters(network)
    memory = memory_stats(network, scorer)  # of the whole model: before sharding splits it
    shard = sharding.requested(args)
    if shard is not None:
        sharding.shard_roles(network, **shard)
    logger.info("trainable parameters (actor%s): %s of %s; weights of every role %.3f GB = %.3fx one base",
                " + critic" if network.has_critic else "", f"{trainable:,}", f"{total:,}", memory["weights_gb"],
                memory["roles_memory_over_base"])
    start_logs(config, resume, logs=(METRICS_FILE, ROLLOUTS_FILE))
    trainer = PPOTrainer(network, tokenizer, chat, rollout_backend(config, network, tokenizer, chat), reward_funcs,
                         ppo, args, train, evaluation)
    torch.manual_seed(args.seed + rank())  # processes sample different replies (a resume restores each RNG)
    job = TrainingJob(config, tokenizer, chat, train, evaluation, data_sources=datasets_sources(config),
                      stats={"prompts": len(train), "eval_prompts": len(evaluation), "reward_funcs": names,
                             "advantage_estimator": ppo.advantage_estimator,
                             "reward_model_shares_base": shared is not None, **memory},
                      # rank 0 alone answers them at the end: sharded weights would wait for the other ranks
                      sample_prompts=[] if shard is not None else
                      [p.messages for p in (evaluation or train)[:ppo.sample_prompts]])
    return trainer, job, resume


def run(config: RunConfig) -> dict:
    trainer, job, resume = setup(config)
    metrics = trainer.train(resume)
    metrics.update(job.stats)
    trainer.network.use("default")  # the samples are the actor's
    save_final(trainer, job, metrics, plots=plots(config.stage))
    return metrics
