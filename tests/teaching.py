"""A tiny model taught to say given replies: a few full optimizer steps on the replies' tokens only."""

from __future__ import annotations

from pathlib import Path

import torch

from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat


def teach(model_dir: Path, tokenizer, conversations: list[list[Message]], out: Path, steps: int) -> Path:
    """A few full steps on the conversations' replies: the tiny model learns to say them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    chat = ChatFormat(tokenizer)
    encoded = [chat.encode(c) for c in conversations]
    longest = max(len(e.input_ids) for e in encoded)
    ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (longest - len(e.input_ids)) for e in encoded])
    labels = torch.tensor([[t if keep else -100 for t, keep in zip(e.input_ids, e.assistant_mask)]
                           + [-100] * (longest - len(e.input_ids)) for e in encoded])
    mask = (torch.arange(longest)[None, :] < torch.tensor([len(e.input_ids) for e in encoded])[:, None]).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
