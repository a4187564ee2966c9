"""Rollout backends: prompt token ids in, response token ids out, so PPO scores exactly the tokens sampled.

A backend has `generate_ids(prompts, params) -> responses` and `sync(policy, step)` (make the server generate
with the current weights). `EngineRollouts` runs HF `generate` on the live policy through the shared
`GenerationEngine`; `medgpt.serve.vllm_client.VLLMRollouts` asks a vLLM server. A response ends with its
end-of-turn token when the model stopped, and has none when it hit `max_new_tokens`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Protocol

from medgpt.serve.engine import GenerationEngine, SamplingParams


class RolloutBackend(Protocol):
    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]: ...

    def sync(self, policy, step: int) -> None: ...


def cut_at_stop(new_ids: list[int], stop_ids: set[int]) -> list[int]:
    """Generated ids through the first end-of-turn token (kept: the policy must learn to stop); everything
    after it is padding that `generate` added to finished rows."""
    for index, token in enumerate(new_ids):
        if token in stop_ids:
            return new_ids[: index + 1]
    return new_ids


class EngineRollouts:
    """HF `generate` on the policy being trained (no copy, no sync), batched and left-padded by the engine.

    `context()` is entered around each generation: the policy's autocast (fp32 trainable weights on a bf16
    backbone), and under FSDP2 the gathered weights (`medgpt.rl.sharding.gathered`)."""

    def __init__(self, engine: GenerationEngine, batch_size: int,
                 context: Callable[[], ContextManager] = contextlib.nullcontext):
        self.engine = engine
        self.batch_size = batch_size
        self.context = context

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        engine = self.engine
        stop_ids = set(engine.chat_format.stop_token_ids())
        was_training = engine.model.training
        engine.model.eval()  # keeps the KV cache on under gradient checkpointing
        with self.context():
            rows = engine.generate_rows(prompts, params, self.batch_size)
        engine.model.train(was_training)
        return [cut_at_stop(row, stop_ids) for row in rows]

    def sync(self, policy, step: int) -> None:
        return None  # generation runs on the live weights
