"""The RL loop's own options (the trainer options — learning rate, steps, saving, seed — are transformers'
TrainingArguments, of which `TRAINING_OPTIONS` lists the ones the loop reads). `PPOArguments` are the ppo
stage's; `GRPOArguments` and `RLOOArguments` are the same options with the grpo and rloo stages' defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from medgpt.arguments import documented
from medgpt.rl.rewards import DEFAULT_FORMAT_PATTERN

# TrainingArguments that the PPO loop honours; giving any other one is an error rather than silently ignored.
TRAINING_OPTIONS = (
    "output_dir", "seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "max_steps", "num_train_epochs",
    "per_device_train_batch_size", "gradient_accumulation_steps", "save_strategy", "save_steps",
    "save_total_limit", "resume_from_checkpoint", "bf16", "use_cpu", "report_to", "logging_steps", "eval_steps",
    "fsdp", "fsdp_config",
)


@dataclass
class PPOArguments:
    """Options of PPO (RLHF against a reward model)."""

    DEFAULT_REWARDS: ClassVar[tuple[str, ...]] = ()  # reward_funcs without a reward model and without a list

    reward_model_name_or_path: str | None = documented(
        """The reward model the policy maximises: a `medgpt rm` output (LoRA reward adapter or full / merged model).
        A LoRA reward model of the policy's own base (the pipeline's case) is mounted on the policy's base as a
        third adapter instead of loading the base again. Replies are scored from their token ids when the reward
        model reads the policy's tokens (same vocabulary and prompt render), else re-rendered with its template.""",
        default=None,
    )
    reward_funcs: list[str] | None = documented(
        """The rewards, summed with reward_weights: names from `medgpt.rl.rewards`, `reward_model` (the model of
        reward_model_name_or_path; required in this list when both are given), or `module:function` for your own
        (this imports and runs that code; name only modules you trust). A function may return None for a reply
        it does not apply to: that reply's score leaves it out, and a reply no function applies to does not
        train. Default: just the reward model.""",
        default=None,
    )
    reward_weights: list[float] | None = documented(
        """Weights of the rewards, in the order of reward_funcs. Default: 1 each.""",
        default=None,
    )
    reward_model_batch_size: int = documented("Replies scored per reward-model forward pass.", default=8)
    rollout_batch_size: int = documented(
        """Prompts each process answers per step (num_samples_per_prompt replies each). The step's updates run
        over these rollouts in minibatches of per_device_train_batch_size, which must divide rollout_batch_size
        x num_samples_per_prompt. Bigger batches give steadier advantage estimates; 64-512 rollouts per step over
        all processes is common on GPUs.""",
        default=8,
    )
    num_samples_per_prompt: int = documented(
        """Replies sampled per prompt. 1 is classic PPO; the group estimators (grpo, rloo) compare a prompt's
        replies with each other and need at least 2 (4-16 is usual).""",
        default=1,
    )
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = documented(
        """How each reply token's advantage is estimated. gae: PPO with a critic (GAE over the critic's values,
        per-token KL penalty in the reward). grpo: (reward - group mean) / group std, KL to the reference as a
        loss term (k3); rloo: reward minus the mean of the prompt's other replies, KL summed into the reward;
        reinforce_pp: REINFORCE++, the whitened return-to-go of PPO's per-token rewards. The last three train no
        critic (no critic adapter, no value passes); grpo and rloo need num_samples_per_prompt >= 2.""",
        default="gae",
    )
    max_prompt_length: int = documented(
        """Longest prompt in tokens. A longer prompt loses its oldest turns first (the system turn and the last
        question stay); if the last question alone is too long, its text loses its beginning while the template's
        header (system turn, role tags) and the assistant header are kept.""",
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
        """Replies per HF `generate` call (the memory bound of generation). Default: all of a step's replies
        (rollout_batch_size x num_samples_per_prompt).""", default=None
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
    gamma: float = documented(
        """Discount factor of GAE and REINFORCE++ returns. 1.0: a reply's final score counts fully for every
        token (replies are short episodes; discounting would favour whatever comes last).""",
        default=1.0)
    lam: float = documented(
        """GAE lambda: 1.0 = Monte-Carlo returns (unbiased, noisy), lower leans on the critic (biased, steadier).
        With a critic that does not know the score yet, lam < 1 hides the score from early tokens: 0.95 passes
        0.95^63 = 4% of it to the first token of a 64-token reply, 1e-11 at 512. 1.0 by default (measured in
        benchmarks/README.md, "PPO's GAE defaults"); lower it once explained_variance is well above 0.""",
        default=1.0,
    )
    cliprange: float = documented(
        "PPO clip epsilon of the policy ratio pi / pi_old (0.2 is the paper's value).", default=0.2
    )
    cliprange_value: float | None = documented(
        """How far the critic's estimate may move from its rollout-time value in one step (clipped value loss),
        in score units. None (default) = no clipping: an absolute clip holds back a critic that starts far from
        the returns (0.2 from a zero head needs 5+ steps to reach a score of 1).""",
        default=None,
    )
    vf_coef: float = documented(
        """Weight of the value loss. The critic has its own adapter, learning rate and gradient clipping, so
        under Adam this mostly matters against adam_epsilon; kept for familiarity.""",
        default=0.1,
    )
    critic_learning_rate: float | None = documented(
        """Learning rate of the critic (its adapter and value head). None = learning_rate. Critics usually
        need a larger one than the actor (OpenRLHF's defaults: 9e-6 vs 5e-7); the schedule is the actor's.""",
        default=None,
    )
    critic_warmup_steps: int = documented(
        """The first N steps train only the critic (the actor stays as it is, the KL coefficient too), so
        advantages come from a critic that has seen some returns. 0 = off. gae only.""",
        default=0,
    )
    critic_init: Literal["reward_model", "policy", "zero"] | None = documented(
        """Where the critic starts. reward_model: the reward model's adapter and score head (values start as the
        reward model's score of each prefix, mapped on the first step by the least-squares line, slope >= 0, onto
        that batch's returns; needs a reward model that is a LoRA adapter of the policy's base). policy: the
        start policy's features (a copy of the SFT adapter it continues) and a zero head. zero: the bare base and a zero head. policy and zero are
        the same when there is no adapter to copy (a new adapter, or full training). Default: reward_model when
        possible, else policy.""",
        default=None,
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
    format_pattern: str = documented(
        """Regular expression the whole reply must match for the format_reward rule (dot matches newlines). The
        default asks for DeepSeek-R1 style `<think>…</think><answer>…</answer>`; answer rewards then score only
        the <answer> part.""",
        default=DEFAULT_FORMAT_PATTERN,
    )
    length_penalty_start: int | None = documented(
        """length_penalty: replies up to this many tokens cost nothing, longer ones lose linearly up to -1 at
        max_new_tokens. Default: half of max_new_tokens.""",
        default=None,
    )
    logged_samples: int = documented(
        "Rollouts per step written to rollouts.jsonl (prompt, reply, score) for a look at what is learnt.",
        default=2,
    )
    sample_prompts: int = documented(
        """After training, answer this many held-out prompts (validation split, else training prompts) greedily
        with the final policy (up to 128 new tokens each) and write them to samples.jsonl. 0 = off, e.g. when an
        evaluation answers held-out questions anyway; generation is slow on CPU. Sharded runs skip the default
        and refuse a value set (rank 0 alone would generate).""",
        default=3,
    )


@dataclass
class GRPOArguments(PPOArguments):
    """Options of GRPO (group-relative policy optimisation: our RL loop with the grpo estimator)."""

    DEFAULT_REWARDS: ClassVar[tuple[str, ...]] = ("answer_f1",)

    reward_funcs: list[str] | None = documented(
        """The rewards, summed with reward_weights: answer_f1 (key-term F1 against the reference answer;
        option-letter match for multiple choice), answer_recall, choice_match, format_reward, length_penalty,
        reward_model (the model at reward_model_name_or_path), or your own `package.module:function` /
        `path/file.py:function` with TRL's signature f(prompts, completions, completion_ids, **columns) ->
        list[float | None] (this imports and RUNS ITS CODE). Default: reward_model when
        reward_model_name_or_path is set, else answer_f1.""",
        default=None,
    )
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = documented(
        """grpo (default here): each reply's advantage is (reward - group mean) / (group std + 1e-4), the KL to
        the reference a loss term (k3, weight kl_coef). See the ppo stage for the others.""",
        default="grpo",
    )
    num_samples_per_prompt: int = documented(
        """Replies per prompt (the group; TRL's num_generations). Groups need reward variance to learn: 4-16.""",
        default=4,
    )
    kl_coef: float = documented(
        """Weight of the KL term to the reference (TRL's beta). 0 (default) needs no reference pass at all;
        DeepSeek-R1 used 0.001.""",
        default=0.0,
    )
    ppo_epochs: int = documented(
        """Passes over each step's replies (TRL's num_iterations). 1 (default): on-policy, the ratio stays 1 and
        clipping (cliprange, TRL's epsilon) only matters from the second pass.""",
        default=1,
    )


@dataclass
class RLOOArguments(GRPOArguments):
    """Options of RLOO (REINFORCE with a leave-one-out baseline: our RL loop with the rloo estimator)."""

    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = documented(
        """rloo (default here): each reply's advantage is its reward minus the mean of the prompt's other
        replies; the KL to the reference (kl_coef, summed over the reply) is part of the reward.""",
        default="rloo",
    )
    kl_coef: float = documented("Weight of the KL penalty folded into the reward (TRL's beta).", default=0.05)
