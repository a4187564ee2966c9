"""PPO's own options (the trainer options — learning rate, steps, saving, seed — are transformers'
TrainingArguments, of which `TRAINING_OPTIONS` lists the ones PPO reads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medgpt.arguments import documented

# TrainingArguments that the PPO loop honours; giving any other one is an error rather than silently ignored.
TRAINING_OPTIONS = (
    "output_dir", "seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "max_steps", "num_train_epochs",
    "per_device_train_batch_size", "gradient_accumulation_steps", "save_strategy", "save_steps",
    "save_total_limit", "resume_from_checkpoint", "bf16", "use_cpu", "report_to", "logging_steps",
)


@dataclass
class PPOArguments:
    """Options of PPO (RLHF against a reward model)."""

    reward_model_name_or_path: str | None = documented(
        """The reward model PPO maximises: a `medgpt rm` output (LoRA reward adapter or full / merged model).
        Replies are re-rendered with the reward model's own chat template before scoring.""",
        default=None,
    )
    reward_funcs: list[str] | None = documented(
        """The rewards, summed with reward_weights: names from `medgpt.rl.rewards`, `reward_model` (the model of
        reward_model_name_or_path; required in this list when both are given), or `module:function` for your own
        (this imports and runs that code; name only modules you trust). Default: just the reward model.""",
        default=None,
    )
    reward_weights: list[float] | None = documented(
        """Weights of the rewards, in the order of reward_funcs. Default: 1 each.""",
        default=None,
    )
    reward_model_batch_size: int = documented("Replies scored per reward-model forward pass.", default=8)
    rollout_batch_size: int = documented(
        """Prompts each process answers per PPO step (one reply each). The step's updates run over these
        rollouts in minibatches of per_device_train_batch_size, which must divide it. Bigger batches give
        steadier advantage estimates; 64-512 rollouts per step over all processes is common on GPUs.""",
        default=8,
    )
    max_prompt_length: int = documented(
        "Longest prompt in tokens; longer prompts lose their oldest tokens (the question at the end is kept).",
        default=512,
    )
    max_new_tokens: int = documented(
        """Longest reply in tokens. Replies cut off here have no end-of-turn token: see missing_eos_penalty.""",
        default=128,
    )
    temperature: float = documented(
        """Sampling temperature of the rollouts; log-probs are computed at the same temperature. Must be > 0:
        PPO needs the policy's own samples. 1.0 samples the policy as it is.""",
        default=1.0,
    )
    top_p: float = documented(
        "Nucleus sampling for rollouts. 1.0 (default) keeps sampling on-policy; lower values bias the samples.",
        default=1.0,
    )
    top_k: int = documented("Top-k sampling for rollouts (0 = off).", default=0)
    generation_batch_size: int | None = documented(
        "Prompts per HF `generate` call (memory bound of generation). Default: rollout_batch_size.", default=None
    )
    ppo_epochs: int = documented(
        """Passes of minibatch updates over each step's rollouts. More reuse each (expensive) rollout more, at
        the risk of moving too far from the sampling policy (watch clipfrac and approx_kl). 1-4 is usual.""",
        default=4,
    )
    kl_coef: float = documented(
        """Weight of the per-token KL penalty to the reference (the policy as the stage starts): the leash that
        keeps the policy from gaming the reward model. With target_kl it is only the starting value.""",
        default=0.05,
    )
    target_kl: float | None = documented(
        """Adaptive KL control (Ziegler et al. 2019): the coefficient grows when the observed KL per reply
        exceeds this target and shrinks below it. None (default) keeps kl_coef fixed. 3-6 nats is typical.""",
        default=None,
    )
    kl_horizon: float = documented(
        "Adaptive KL: rollouts over which the coefficient may change by about +-20%.", default=10000.0
    )
    kl_estimator: Literal["k1", "k3"] = documented(
        """Per-token KL estimate in the penalty: k1 = log pi - log ref (classic, can be negative per token),
        k3 = (r - 1) - log r (never negative, lower variance).""",
        default="k1",
    )
    gamma: float = documented("Discount factor of GAE. 1.0: a reply's final reward counts fully for every token.",
                              default=1.0)
    lam: float = documented(
        "GAE lambda: 1.0 = Monte-Carlo returns (unbiased, noisy), lower leans on the critic (biased, steadier).",
        default=0.95,
    )
    cliprange: float = documented(
        "PPO clip epsilon of the policy ratio pi / pi_old (0.2 is the paper's value).", default=0.2
    )
    cliprange_value: float = documented(
        "How far the critic's estimate may move from its rollout-time value in one step (clipped value loss).",
        default=0.2,
    )
    vf_coef: float = documented(
        """Weight of the value loss. The critic has its own adapter, so this mostly matters through the shared
        gradient-norm clipping (max_grad_norm).""",
        default=0.1,
    )
    entropy_coef: float = documented(
        "Weight of an entropy bonus that keeps sampling diverse (0 = off; try 0.001-0.01 if replies collapse).",
        default=0.0,
    )
    reward_normalization: Literal["none", "batch", "running"] = documented(
        """Standardise scores before PPO sees them: none, batch (within each step's rollouts), or running
        (with the mean and std of all scores so far: keeps the scale stable across steps).""",
        default="none",
    )
    reward_clip: float | None = documented(
        "Clip (normalised) scores to [-x, x], guarding against reward-model outliers. None = no clipping.",
        default=None,
    )
    missing_eos_penalty: float | None = documented(
        """Subtracted from the score of replies that hit max_new_tokens without ending, so the policy is not
        rewarded for rambling (TRL's option of the same name). 1.0 is a good start; None = off.""",
        default=None,
    )
    generation_backend: Literal["hf", "vllm"] = documented(
        """hf: HF `generate` on the live policy (any setup). vllm: a vLLM server in its own environment,
        reached over HTTP; the LoRA adapter is synced to it after every step (see the README).""",
        default="hf",
    )
    vllm_server_url: str = documented("Base URL of the vLLM OpenAI server.", default="http://localhost:8000")
    vllm_model_name: str | None = documented(
        "The base model's name on the vLLM server. Default: the first model it lists.", default=None
    )
    vllm_sync_dir: str | None = documented(
        "Where adapters are saved for the vLLM server to load; it must see this path. Default: output_dir/vllm.",
        default=None,
    )
    logged_samples: int = documented(
        "Rollouts per step written to rollouts.jsonl (prompt, reply, score) for a look at what is learnt.",
        default=2,
    )
