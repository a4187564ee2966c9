"""Log-likelihood of token continuations under a causal LM, batched: the one scoring primitive behind
perplexity and multiple-choice accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medgpt.models.reward import right_padded


@dataclass
class Continuation:
    """A token sequence of which `ids[start:]` is scored, each token predicted from all tokens before it."""

    ids: list[int]
    start: int  # >= 1: the first token has nothing to be predicted from

    def __post_init__(self):
        if not 1 <= self.start < len(self.ids):
            raise ValueError(f"a continuation must score 1..{len(self.ids) - 1} tokens, not from index {self.start}")


@dataclass
class LogLikelihood:
    logprob: float  # sum of the log-probabilities of the scored tokens
    tokens: int  # how many tokens were scored

    @property
    def mean(self) -> float:
        """Length-normalised: log-probability per token."""
        return self.logprob / self.tokens


@torch.inference_mode()
def continuation_logprobs(model, items: list[Continuation], pad_id: int, batch_size: int = 8,
                          desc: str = "scoring") -> list[LogLikelihood]:
    """The log-likelihood of each continuation, in input order; one forward pass per batch.

    Rows are batched by similar length and right-padded: under causal attention, padding after a sequence
    cannot change its logits, and positions start at 0 in every row as they do when a sequence runs alone.
    Only the logits from the earliest scored position on are computed (`logits_to_keep`), which matters for
    long few-shot prompts with short answers: logits are batch x positions x vocabulary floats.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    results: list[LogLikelihood | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    for begin in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = [items[i] for i in order[begin:begin + batch_size]]
        ids, mask = right_padded([item.ids for item in batch], pad_id)
        first = min(item.start for item in batch) - 1  # the logits at position p predict token p + 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                       logits_to_keep=ids.shape[1] - first).logits  # (B, T - first, V)
        for row, (index, item) in enumerate(zip(order[begin:begin + batch_size], batch)):
            targets = torch.tensor(item.ids[item.start:], device=device)
            predicted = logits[row, item.start - 1 - first: len(item.ids) - 1 - first].float()  # (n, V)
            logprob = predicted.log_softmax(-1).gather(-1, targets[:, None]).sum()
            results[index] = LogLikelihood(logprob.item(), len(targets))
    return results


@torch.inference_mode()
def shared_prompt_logprobs(model, prompt: list[int], continuations: list[list[int]], pad_id: int) -> list[LogLikelihood]:
    """Several continuations of one prompt (a question's options): the prompt runs once and its KV cache is
    reused by every continuation, instead of running prompt + continuation once per option. Same numbers as
    `continuation_logprobs` on `prompt + continuation` (tests/test_evaluation.py)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].float().log_softmax(-1)  # predicts every continuation's first token
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(continuations))
    ids, mask = right_padded(continuations, pad_id)
    n = len(prompt)
    attention = torch.cat([torch.ones(len(continuations), n, dtype=mask.dtype), mask], dim=1)
    positions = torch.arange(n, n + ids.shape[1]).expand(len(continuations), -1)
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
                   past_key_values=cache, use_cache=True).logits.float().log_softmax(-1)
    results = []
    for row, tail in enumerate(continuations):
        targets = torch.tensor(tail, device=device)
        logprob = first[targets[0]] + logits[row, : len(tail) - 1].gather(-1, targets[1:, None]).sum()
        results.append(LogLikelihood(logprob.item(), len(tail)))
    return results
