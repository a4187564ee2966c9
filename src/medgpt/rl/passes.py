"""The forward passes of the RL roles as modules: per-token log-probs and entropy of a causal LM (actor,
reference), values and reward-model scores on the backbone. Modules of their own so that under FSDP2 each pass
is the root that gathers the weights it uses (`medgpt.rl.sharding`)."""

from __future__ import annotations

import torch
from torch import nn

from medgpt.models.reward import last_token_positions
from medgpt.rl.token_stats import LogitTransform, token_stats


def response_hidden(model, batch: dict, response_length: int) -> torch.Tensor:
    """(B, R, H): the decoder's last hidden state before each response token (position t predicts token t)."""
    decoder = model.get_decoder()  # the transformer without its LM head
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    return hidden[:, -response_length - 1:-1]


class TokenStatsForward(nn.Module):
    """Per-token log-probs and entropy of a causal LM, from chunks of its LM head."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, tokens, mask, temperature: float, entropy: str):
        hidden = response_hidden(self.model, batch, tokens.shape[1])
        return token_stats(hidden, tokens, mask, self.model.get_output_embeddings(),
                           LogitTransform.of(self.model.config, temperature), entropy)


class BackboneForward(TokenStatsForward):
    """The roles on the backbone (the policy's own base under LoRA, its frozen copy under full training):
    reference log-probs, critic values, reward scores; which adapter is on is the caller's business."""

    def __init__(self, model, value_head: nn.Linear | None, reward_head: nn.Linear | None):
        super().__init__(model)
        self.value_head, self.reward_head = value_head, reward_head

    def forward(self, role: str, batch, tokens=None, mask=None, temperature: float = 1.0, response_length: int = 0):
        if role == "reference":
            return super().forward(batch, tokens, mask, temperature, "none")[0]
        if role == "values":
            hidden = response_hidden(self.model, batch, response_length)
            with torch.autocast(hidden.device.type, enabled=False):  # the head computes in fp32
                return self.value_head(hidden.float()).squeeze(-1)
        if role == "reward":
            mask = batch["attention_mask"]
            hidden = self.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask,
                                              use_cache=False).last_hidden_state
            pooled = hidden[torch.arange(len(hidden), device=hidden.device), last_token_positions(mask)]
            with torch.autocast(hidden.device.type, enabled=False):
                return self.reward_head(pooled.float()).squeeze(-1)
        raise ValueError(f"unknown backbone role '{role}'")
