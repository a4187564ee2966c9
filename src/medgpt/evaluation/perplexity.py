"""Perplexity on held-out text: each document scored on its own, tokenised as continued pretraining does
(no special tokens, EOS appended where the document ends), token-weighted over the whole set."""

from __future__ import annotations

import math

from medgpt.data.processors import document_ids
from medgpt.data.records import TextRecord
from medgpt.evaluation.likelihood import Continuation, continuation_logprobs


def perplexity(model, tokenizer, records: list[TextRecord], max_length: int, batch_size: int = 8) -> tuple[dict, list[dict]]:
    """(metrics, one row per document: its NLL sum and tokens, for paired comparisons). Perplexity is
    exp(total NLL / tokens predicted). A document longer than `max_length` keeps its first `max_length`
    tokens (so it has no EOS to predict); its first token is never scored, as in PT's loss."""
    documents = [(r, ids) for r in records for ids in document_ids([r], tokenizer)]  # an empty one has none
    truncated = sum(len(d) > max_length for _, d in documents)
    kept = [(r, d) for r, d in documents if min(len(d), max_length) > 1]
    items = [Continuation(d[:max_length], 1) for _, d in kept]
    if not items:
        raise ValueError("no held-out document has two tokens to score")
    scores = continuation_logprobs(model, items, tokenizer.pad_token_id, batch_size, desc="perplexity")
    tokens = sum(s.tokens for s in scores)
    nll = -sum(s.logprob for s in scores) / tokens
    rows = [{"source": str(r.source), "nll": -s.logprob, "tokens": s.tokens} for (r, _), s in zip(kept, scores)]
    return {"perplexity": math.exp(nll), "perplexity_nll": nll, "perplexity_tokens": tokens,
            "perplexity_docs": len(items), "perplexity_truncated": truncated}, rows
