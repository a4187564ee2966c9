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
def shared_prompts_logprobs(model, prompts: list[list[int]], continuations: list[list[list[int]]],
                            pad_id: int) -> list[list[LogLikelihood]]:
    """Several continuations of each of several prompts (a batch of questions and their options): each prompt
    runs once and its KV cache is reused by every one of its continuations, instead of running prompt +
    continuation once per option. The prompts run together, left-padded (each row's positions start at 0 after
    its padding); each row's cache is copied for its own continuations, which run together right-padded. Same
    numbers as `continuation_logprobs` on every `prompt + continuation` (tests/test_mcq_scoring.py)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)  # (P, V): predicts each prompt's continuations' first token
    owner = [i for i, tails in enumerate(continuations) for _ in tails]
    cache = out.past_key_values
    cache.batch_select_indices(torch.tensor(owner, device=device))
    tails = [tail for group in continuations for tail in group]
    tail_ids, tail_mask = right_padded(tails, pad_id)
    lengths = torch.tensor([len(prompts[i]) for i in owner])
    attention = torch.cat([mask[owner].cpu(), tail_mask], dim=1)
    tail_positions = lengths[:, None] + torch.arange(tail_ids.shape[1])[None, :]
    logits = model(input_ids=tail_ids.to(device), attention_mask=attention.to(device),
                   position_ids=tail_positions.to(device), past_key_values=cache, use_cache=True).logits
    logits = logits.float().log_softmax(-1)
    results: list[list[LogLikelihood]] = [[] for _ in prompts]
    for row, (i, tail) in enumerate(zip(owner, tails)):
        targets = torch.tensor(tail, device=device)
        logprob = first[i, targets[0]] + logits[row, : len(tail) - 1].gather(-1, targets[1:, None]).sum()
        results[i].append(LogLikelihood(logprob.item(), len(tail)))
    return results
