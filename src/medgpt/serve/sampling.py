"""Per-row sampling: each row of a batch with its own temperature, top-p/top-k, repetition penalty and random
generator, so a seeded answer is the same whatever it shares a batch with.

transformers' continuous batching samples the whole batch with one `do_sample` switch and the global RNG, and
drops the repetition penalty (`supports_continuous_batching = False`); its per-request temperature/top-k/top-p
warpers exist only when the manager's generation config already set them. So the batch runs greedy (argmax),
and `RowSampler`, a continuous-batching logits processor, chooses each sampled row's token with transformers' own
warpers and that row's `torch.Generator`, then hands argmax a row where only that token is possible. Logits
arrive in fp32 (the batching casts them), whatever dtype the model computes in.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from medgpt.serve.rows import SamplingParams


class RowSampling:
    """One row's way of choosing its next token."""

    def __init__(self, params: SamplingParams):
        self.greedy = params.temperature <= 0
        self.penalty = (RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
                        if params.repetition_penalty != 1.0 else None)
        warpers = []
        if not self.greedy:
            warpers.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)  # the order `generate` applies them in
        # No seed: draw one from the global RNG, so `torch.manual_seed` still makes a run reproducible.
        self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator: torch.Generator | None = None  # made on the logits' device at the first token
        self.history: list[int] = []  # prompt + generated ids, for the repetition penalty

    @property
    def plain_argmax(self) -> bool:
        return self.greedy and self.penalty is None

    def choose(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """(V,) logits -> (V,) fp32 scores whose argmax is this row's next token."""
        logits = logits.float()
        scores = logits[None]  # (1, V): the warpers work on batches
        if self.penalty is not None:
            ids = history if history is not None else torch.tensor(self.history, device=logits.device)
            scores = self.penalty(ids.view(1, -1), scores)
        if self.greedy:
            return scores[0]
        scores = self.warpers(None, scores)
        if self.generator is None:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        token = torch.multinomial(scores.softmax(-1)[0], 1, generator=self.generator)
        chosen = torch.full_like(logits, float("-inf"))
        chosen[token] = 0.0
        return chosen


class RowSampler(ContinuousBatchingLogitsProcessor):
    """Continuous batching's hook: each request carries `row` (a key into `rows`), read back per batch row."""

    supported_kwargs = {"row": int}
    ignored_kwargs = ()

    def __init__(self, rows: dict[int, RowSampling]):
        self.rows = rows

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)  # no row: plain argmax

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        keys = []
        for request in requests_with_new_token:
            key = request.state.logit_processor_kwargs.get("row", -1)
            row = self.rows.get(key)
            if row is not None and row.penalty is not None:  # the batch runs synchronously: the state is current
                row.history = request.state.initial_tokens + request.state.generated_tokens
            keys.append(key)
        return torch.tensor(keys, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        for index, key in enumerate(tensor_arg[: scores.shape[0]].tolist()):
            row = self.rows.get(key)  # None: cancelled since it was scheduled; its token is thrown away
            if row is not None and not row.plain_argmax:
                scores[index] = row.choose(scores[index])
        return scores


def sampler_processors(rows: dict[int, RowSampling]):
    """The manager's logits processors: `RowSampler` alone, with the one argument row it needs."""
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )

    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([RowSampler(rows)]))
    processors.tensors_required = 1  # counted only for the processors it converts itself
    return processors


class OneRowSampler(LogitsProcessor):
    """The same choice inside `generate` (one row, greedy search), for models continuous batching cannot run."""

    def __init__(self, row: RowSampling):
        self.row = row

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.row.plain_argmax:
            return scores
        return self.row.choose(scores[0], history=input_ids[0])[None]
