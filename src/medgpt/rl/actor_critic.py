"""The four networks of RLHF — policy (actor), value function (critic), reference and reward model — over as few
copies of the base weights as possible.

LoRA (the default): ONE base model carries the actor's adapter ("default"), the critic's own adapter ("critic"),
when the stage starts from an SFT adapter a frozen copy of it ("ref"), and when the reward model is a LoRA
adapter of the same base its adapter ("reward") with its score head. One adapter is active per forward pass, so
all four share every base weight: memory is one base + adapters. The reference is the policy as the stage
starts: the base with adapters disabled, or the "ref" copy of the SFT adapter.
Full training: the actor is the whole model, and one frozen copy of it is the reference (adapters off), the
critic's backbone ("critic" adapter on) and the reward model's ("reward" adapter on): two bases. Critic-free
estimators without a reference or reward adapter need no copy at all.

The critic is its own adapter plus a linear value head on the backbone's last hidden state, not a head on the
actor's hidden state: policy and value gradients do not fight over the same weights. It starts (`critic_init`)
from the reward model (adapter and score head: InstructGPT's and OpenRLHF's choice), from the start policy, or
from the bare base with a zero head.

Precision: every trainable tensor is fp32 whatever the backbone's dtype (LoRA weights by peft, the value head
here, full training's weights upcast here), and forward passes run under `autocast` in the backbone's low
precision; the value head always computes in fp32 (a bf16 weight stops moving under updates below 2^-8 of it).
Activation checkpointing recomputes a layer in the backward pass with whichever adapter is active then: each
role's forward leaves its adapter active, and the trainer runs that role's backward before the next forward.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from medgpt.models.adapters import lora_config
from medgpt.rl.passes import BackboneForward, TokenStatsForward

logger = logging.getLogger(__name__)

ACTOR, CRITIC, REFERENCE, REWARD = "default", "critic", "ref", "reward"
CRITIC_INITS = ("reward_model", "policy", "zero")


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (LoRA's too): the log-probs of the rollout and of the update must come from the
    same function, or the PPO ratio starts away from 1 for no reason."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0


def adapter_state(model, adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's LoRA weights under peft's saved names (adapter name stripped)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter)


def load_adapter_state(model, adapter: str, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter weights do not fit the {adapter} adapter (e.g. {unexpected[0]})")


def _upcast_trainable(parameters) -> None:
    for param in parameters:
        if param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def _base(model):
    """The transformers model under a peft wrapper (LoRA layers injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ActorCritic(nn.Module):
    """Forward passes over `batch` dicts: input_ids, attention_mask, position_ids (B, P + R), responses
    left-aligned after a P-wide left-padded prompt; every output is (B, R) over the response positions."""

    def __init__(self, policy, backbone, value_head: nn.Linear | None, reference_adapter: str | None,
                 reward_head: nn.Linear | None = None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.policy = policy  # generates; its "default" adapter (or all its weights) is the actor
        self.backbone = backbone  # holds critic / reward adapters: the policy under LoRA, a frozen copy (or None)
        self.value_head = value_head  # None: a critic-free estimator
        self.reward_head = reward_head  # the shared reward model's score head (frozen), or None
        self.reference_adapter = reference_adapter  # "ref", or None: the backbone with adapters disabled
        self.compute_dtype = compute_dtype
        self.lora = policy is backbone
        # The passes as modules of their own: under FSDP2 each is the root that gathers the weights it uses.
        self.actor_forward = TokenStatsForward(_base(policy))
        self.backbone_forward = BackboneForward(_base(backbone), value_head, reward_head) if backbone is not None \
            else None
        self.critic_from_reward_model = False  # set by `build`; the trainer calibrates such a head once
        self.has_reference = True  # set by `build`: False when no reference forward was prepared
        self.gather_for_generation = None  # set by `medgpt.rl.sharding`: a context that unshards the policy
        self.refresh_trainable()
        _upcast_trainable(self.trainable)

    @classmethod
    def build(cls, model, adapter_args, use_peft: bool, reference_adapter_path: str | None = None, *,
              critic: bool = True, critic_init: str = "policy", reward_adapter=None, reference: bool = True,
              bf16: bool = False) -> "ActorCritic":
        """`model`: the policy, already wrapped with its LoRA adapter (use_peft) or plain (full training).
        `reward_adapter`: a `medgpt.rl.reward_adapter.RewardAdapter` to mount as the "reward" adapter, or None;
        `reference`: whether a reference forward is needed at all (no KL term: no frozen copy for it)."""
        from peft import PeftModel, get_peft_model

        if critic_init not in CRITIC_INITS:
            raise ValueError(f"critic_init '{critic_init}' is not one of {', '.join(CRITIC_INITS)}")
        if critic and critic_init == "reward_model" and reward_adapter is None:
            raise ValueError("critic_init reward_model needs a reward model that is a LoRA adapter of the policy's "
                             "base (see the log for why this one is not): use critic_init policy or zero")
        if use_peft:
            backbone = model
            reference_name = None
            if reference_adapter_path and reference:
                model.load_adapter(reference_adapter_path, adapter_name=REFERENCE, is_trainable=False)
                reference_name = REFERENCE
        else:
            reference_name = None
            backbone = None
            if critic or reference or reward_adapter is not None:
                backbone = copy.deepcopy(model).requires_grad_(False)
        head = None
        if critic:
            config = cls._critic_config(model, adapter_args, use_peft, critic_init, reward_adapter)
            if isinstance(backbone, PeftModel):
                backbone.add_adapter(CRITIC, config)
            else:
                backbone = get_peft_model(backbone, config, adapter_name=CRITIC)
            if critic_init == "policy" and use_peft:
                load_adapter_state(backbone, CRITIC, adapter_state(backbone, ACTOR))
            head = nn.Linear(_base(backbone).config.get_text_config().hidden_size, 1)
            # Zero unless it comes from the reward model: the first advantages are then plain returns instead of
            # a random head's noise, which at a large model's hidden-state scale drowns the reward.
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if reward_adapter is not None:
            if isinstance(backbone, PeftModel):
                reward_adapter.mount(backbone, REWARD)
            else:
                backbone = get_peft_model(backbone, reward_adapter.lora_config(), adapter_name=REWARD)
                load_adapter_state(backbone, REWARD, reward_adapter.lora_state)
                backbone.requires_grad_(False)  # frozen: only the critic's adapter (if any) trains here
        reward_head = reward_adapter.score_head() if reward_adapter is not None else None
        if critic and critic_init == "reward_model":
            load_adapter_state(backbone, CRITIC, reward_adapter.lora_state)
            with torch.no_grad():
                head.weight.copy_(reward_head.weight)
                head.bias.copy_(reward_head.bias if reward_head.bias is not None else torch.zeros(1))
        device = next(model.parameters()).device
        for module in (head, reward_head):
            if module is not None:
                module.to(device=device, dtype=torch.float32)
        low = [p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
        compute_dtype = torch.bfloat16 if bf16 or torch.bfloat16 in low else (low[0] if low else torch.float32)
        network = cls(model, backbone, head, reference_name, reward_head, compute_dtype)
        network.critic_from_reward_model = critic and critic_init == "reward_model"
        network.has_reference = reference and (use_peft or backbone is not None)
        network.use(ACTOR)
        disable_dropout(network)
        return network

    @staticmethod
    def _critic_config(model, adapter_args, use_peft: bool, critic_init: str, reward_adapter):
        if critic_init == "reward_model":
            return reward_adapter.lora_config()
        if critic_init == "policy" and use_peft:
            config = copy.deepcopy(model.peft_config[ACTOR])
        else:
            config = lora_config(adapter_args, "CAUSAL_LM")
        config.modules_to_save = None  # the actor's extra full modules (new embeddings) are not shared
        config.inference_mode = False
        return config

    # ---------------------------------------------------------------------------------------- adapters

    def use(self, adapter: str) -> None:
        """Make `adapter` the active one of its model (peft keeps one active adapter per forward)."""
        model = self.policy if adapter == ACTOR else self.backbone
        if adapter == ACTOR and not self.lora:
            return
        if model.active_adapter != adapter:
            model.set_adapter(adapter, inference_mode=adapter in (REFERENCE, REWARD))
            self._restore_trainable()

    def refresh_trainable(self) -> None:
        """(Re)build the lists of trainable parameters (after FSDP2 replaced them by sharded ones)."""
        self.actor_named, self.critic_named = self._select_trainable()
        self.named_trainable = self.actor_named + self.critic_named
        self.trainable = [param for _, param in self.named_trainable]
        self._restore_trainable()

    def _restore_trainable(self) -> None:
        # peft's set_adapter also freezes every inactive adapter; the optimizer's parameters must stay trainable.
        for param in self.trainable:
            param.requires_grad_(True)

    def _select_trainable(self):
        """(actor, critic) parameters by name, in a fixed order (optimizer groups, gradient averaging and
        checkpoints). Chosen by adapter name: which adapters peft marks trainable depends on the last one set."""
        def adapter_parameters(prefix: str, model, name: str):
            return [(prefix + n, p) for n, p in model.named_parameters() if name in n.split(".")]

        if self.lora:
            actor = adapter_parameters("policy.", self.policy, ACTOR)
        else:  # the whole policy (but layers frozen by freeze_trainable_layers)
            actor = [("policy." + n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        critic = []
        if self.value_head is not None:
            critic = adapter_parameters("policy." if self.lora else "backbone.", self.backbone, CRITIC)
            critic += [("value_head." + n, p) for n, p in self.value_head.named_parameters()]
        return actor, critic

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    def autocast(self):
        """The backbone's low precision for matrix products (bf16 / fp16), or nothing under fp32."""
        device = next(self.policy.parameters()).device
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def generation_context(self) -> contextlib.ExitStack:
        """What generation on the policy runs under: its autocast, and when sharded its gathered weights."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast())
        if self.gather_for_generation is not None:
            stack.enter_context(self.gather_for_generation())
        return stack

    # ---------------------------------------------------------------------------------------- forwards

    def policy_token_stats(self, batch: dict, tokens: torch.Tensor, mask: torch.Tensor, temperature: float,
                           entropy: str = "value") -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(token), entropy), (B, R) each (`entropy`: none | value | grad, see `token_stats`); the actor
        stays active for the backward pass."""
        self.use(ACTOR)
        return self.actor_forward(batch, tokens, mask, temperature, entropy)

    @torch.no_grad()
    def reference_logprobs(self, batch: dict, tokens: torch.Tensor, mask: torch.Tensor,
                           temperature: float) -> torch.Tensor:
        if self.reference_adapter:
            self.use(REFERENCE)
            logprobs = self.backbone_forward("reference", batch, tokens, mask, temperature)
            self.use(ACTOR)
            return logprobs
        model = self.backbone
        context = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with context:
            return self.backbone_forward("reference", batch, tokens, mask, temperature)

    def values(self, batch: dict, response_length: int) -> torch.Tensor:
        """(B, R): V(prompt + response[:t]) for each response position t. The critic adapter stays active, so
        run this output's backward before the next forward of another role."""
        self.use(CRITIC)
        return self.backbone_forward("values", batch, response_length=response_length)

    @torch.no_grad()
    def reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) the shared reward model's score of right-padded sequences, read at each row's last real token."""
        self.use(REWARD)
        scores = self.backbone_forward("reward", {"input_ids": input_ids, "attention_mask": attention_mask})
        self.use(ACTOR)
        return scores

    # ---------------------------------------------------------------------------------------- accounting

    def weight_bytes(self) -> tuple[int, int]:
        """(bytes of every weight the roles hold, counted once per storage; bytes of one base model)."""
        from medgpt.rl.distributed import local_tensor

        seen, total = set(), 0
        for tensor in [local_tensor(t) for t in [*self.parameters(), *self.buffers()]]:
            key = (tensor.untyped_storage().data_ptr(), tensor.device)
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
        base = _base(self.policy)
        adapter_words = ("lora_", "modules_to_save", "original_module")
        base_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters()
                         if not any(w in n for w in adapter_words))
        return total, base_bytes

    # ---------------------------------------------------------------------------------------- saving

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().contiguous().cpu() for name, param in self.named_trainable}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.named_trainable)
        missing, unexpected = sorted(set(named) - set(state)), sorted(set(state) - set(named))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}): resume with the options the run started with")
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(state[name].to(param.device, param.dtype))

    def save_actor(self, directory: str, write: bool = True) -> None:
        """The policy as every other stage saves its model: the actor adapter alone, or the full model. Every
        process calls it (sharded weights are gathered); only the one with `write` writes."""
        from medgpt.rl.distributed import is_sharded, local_tensor

        if self.lora:
            if write:
                self.policy.save_pretrained(directory, selected_adapters=[ACTOR])
            return
        gathered: dict[int, torch.Tensor] = {}  # by storage: tied weights stay one tensor, saved once
        state = {}
        for name, tensor in self.policy.state_dict().items():  # every process gathers, in the same order
            key = local_tensor(tensor).untyped_storage().data_ptr()
            if key not in gathered:
                gathered[key] = (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().cpu()
            state[name] = gathered[key]
        if write:
            self.policy.save_pretrained(directory, state_dict=state)
