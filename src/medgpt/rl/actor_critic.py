"""The three networks PPO needs — policy (actor), value function (critic) and reference — over as few copies of
the base weights as possible.

LoRA (the default): ONE base model carries the actor's adapter ("default"), the critic's own adapter
("critic") and, when the stage starts from an SFT adapter, a frozen copy of it ("ref"). Only one adapter is
active per forward pass, so the three share every base weight; memory is one base + adapters (+ the reward
model). The reference is the policy as the stage starts: the base with adapters disabled, or the "ref" copy
of the SFT adapter (disabling adapters would give the pre-SFT base).
Full training: the actor is the whole model, and a frozen copy of it is both the reference (adapters off)
and the critic's backbone (with the "critic" adapter on): two bases, the least full training can have.

The critic is its own adapter plus a linear value head on the backbone's last hidden state, not a head on the
actor's hidden state: policy and value gradients do not fight over the same weights (the instability of
shared-trunk value heads), while still costing no second base model.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from medgpt.models.adapters import lora_config

logger = logging.getLogger(__name__)

ACTOR, CRITIC, REFERENCE = "default", "critic", "ref"


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (LoRA's too): the log-probs of the rollout and of the update must come from the
    same function, or the PPO ratio starts away from 1 for no reason."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0


class ActorCritic(nn.Module):
    """Forward passes over `batch` dicts: input_ids, attention_mask, position_ids (B, P + R), responses
    left-aligned after a P-wide left-padded prompt; every output is (B, R[, V]) over the response positions."""

    def __init__(self, policy, backbone, value_head: nn.Linear, reference_adapter: str | None):
        super().__init__()
        self.policy = policy  # generates; its "default" adapter (or all its weights) is the actor
        self.backbone = backbone  # a PeftModel holding the "critic" adapter; the policy itself under LoRA
        self.value_head = value_head
        self.reference_adapter = reference_adapter  # "ref", or None: the backbone with adapters disabled
        self.lora = policy is backbone
        self.named_trainable = self._select_trainable()
        self.trainable = [param for _, param in self.named_trainable]
        self._restore_trainable()

    @classmethod
    def build(cls, model, adapter_args, use_peft: bool, reference_adapter_path: str | None = None) -> "ActorCritic":
        """`model`: the policy, already wrapped with its LoRA adapter (use_peft) or plain (full training)."""
        from peft import get_peft_model

        critic_config = lora_config(adapter_args, "CAUSAL_LM")
        critic_config.modules_to_save = None  # the actor's extra full modules (new embeddings) are not shared
        if use_peft:
            model.add_adapter(CRITIC, critic_config)
            reference = None
            if reference_adapter_path:
                model.load_adapter(reference_adapter_path, adapter_name=REFERENCE, is_trainable=False)
                reference = REFERENCE
            backbone = model
        else:
            frozen = copy.deepcopy(model).requires_grad_(False)
            backbone = get_peft_model(frozen, critic_config, adapter_name=CRITIC)
            reference = None
        hidden = backbone.get_base_model().config.get_text_config().hidden_size
        head = nn.Linear(hidden, 1)
        # Zero at first: the first advantages are plain returns (reward-to-go) instead of a random head's noise,
        # which at the scale of a large model's hidden states drowns the reward; the head learns from there.
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        dtype = next(p for p in backbone.parameters()).dtype
        head.to(device=next(backbone.parameters()).device, dtype=dtype if dtype.is_floating_point else torch.float32)
        network = cls(model, backbone, head, reference)
        disable_dropout(network)
        return network

    # ---------------------------------------------------------------------------------------- adapters

    def use(self, adapter: str) -> None:
        """Make `adapter` the active one of its model (peft keeps one active adapter per forward)."""
        model = self.policy if adapter == ACTOR else self.backbone
        if adapter == ACTOR and not self.lora:
            return
        if model.active_adapter != adapter:
            model.set_adapter(adapter, inference_mode=adapter == REFERENCE)
            self._restore_trainable()

    def _restore_trainable(self) -> None:
        # peft's set_adapter also freezes every inactive adapter; the optimizer's parameters must stay trainable.
        for param in self.trainable:
            param.requires_grad_(True)

    def _select_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Actor, critic adapter and value head parameters, by name, in a fixed order (for the optimizer,
        gradient averaging and checkpoints). Chosen by adapter name, since which adapters peft marks trainable
        depends on which one was set last."""
        def adapter_parameters(prefix: str, model, names: tuple[str, ...]):
            return [(prefix + n, p) for n, p in model.named_parameters() if any(a in n.split(".") for a in names)]

        if self.lora:
            named = adapter_parameters("policy.", self.policy, (ACTOR, CRITIC))
        else:  # the whole policy (but layers frozen by freeze_trainable_layers), the critic adapter of the copy
            named = [("policy." + n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
            named += adapter_parameters("backbone.", self.backbone, (CRITIC,))
        return named + [("value_head." + n, p) for n, p in self.value_head.named_parameters()]

    # ---------------------------------------------------------------------------------------- forwards

    @staticmethod
    def _response_logits(model, batch: dict, response_length: int, temperature: float) -> torch.Tensor:
        # logits_to_keep = R + 1 keeps positions P - 1 … P + R - 1; the last one predicts past the response.
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=response_length + 1, use_cache=False)
        return out.logits[:, :-1].float() / temperature  # (B, R, V): the distribution tokens were sampled from

    def policy_logits(self, batch: dict, response_length: int, temperature: float) -> torch.Tensor:
        self.use(ACTOR)
        return self._response_logits(self.policy, batch, response_length, temperature)

    @torch.no_grad()
    def reference_logits(self, batch: dict, response_length: int, temperature: float) -> torch.Tensor:
        if self.reference_adapter:
            self.use(REFERENCE)
            logits = self._response_logits(self.backbone, batch, response_length, temperature)
            self.use(ACTOR)
            return logits
        with self.backbone.disable_adapter():
            return self._response_logits(self.backbone, batch, response_length, temperature)

    def values(self, batch: dict, response_length: int) -> torch.Tensor:
        """(B, R): V(prompt + response[:t]) for each response position t."""
        self.use(CRITIC)
        decoder = self.backbone.get_base_model().get_decoder()  # the transformer without its LM head
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        hidden = hidden[:, -response_length - 1:-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        self.use(ACTOR)
        return values

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

    def save_actor(self, directory: str) -> None:
        """The policy as every other stage saves its model: the actor adapter alone, or the full model."""
        if self.lora:
            self.policy.save_pretrained(directory, selected_adapters=[ACTOR])
        else:
            self.policy.save_pretrained(directory)
