"""A tiny model taught by heart to answer a few questions, each with its own answer of its own length.

Its greedy answers are known text that ends with `<|im_end|>` at a different step per question, so a batch whose
rows were mixed up, cut at the wrong step or kept going after their end-of-turn shows in the text.
"""

from __future__ import annotations

from pathlib import Path

import torch

TAUGHT = {
    "What is anaemia?": "Too few red blood cells.",
    "Hi": "Hello! How can I help?",
    "Name a vitamin.": "Vitamin C, found in oranges, peppers and broccoli.",
    "What helps a burn?": "Cool running water for twenty minutes, then a clean dressing. See a doctor if it blisters.",
}

_taught: dict[str, Path] = {}  # one training per test session, shared by the test modules that ask


def taught_model_dir(tmp_path_factory, tokenizer) -> Path:
    if "dir" in _taught:
        return _taught["dir"]
    from conftest import make_tiny_model
    from transformers import AutoModelForCausalLM

    from medgpt.data.records import Message
    from medgpt.data.templates import ChatFormat

    directory = make_tiny_model(tmp_path_factory.mktemp("taught-model"), tokenizer, hidden=64)
    chat = ChatFormat(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(directory)
    rows, labels = [], []
    for question, answer in TAUGHT.items():
        prompt = chat.prompt_ids([Message("user", question)])
        reply = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
        rows.append(prompt + reply)
        labels.append([-100] * len(prompt) + reply)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([t + [-100] * (width - len(t)) for t in labels])
    taught = target[:, 1:] != -100  # positions that predict an answer token
    goal = target[:, 1:][taught]
    # The embeddings (tied to the output head) stay random: the layers learn to point at the right ones, and no
    # optimizer step or full-sequence logits over the 49k-token vocabulary are paid for. The pad row starts at
    # zero (`padding_idx`), and pad is <|im_end|> here: a zero output row could never be the argmax.
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[tokenizer.pad_token_id].normal_(0, 0.02)
    embeddings.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(400):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][taught]
        logits = model.lm_head(hidden)
        if torch.equal(logits.argmax(-1), goal):  # greedy decoding now says them all
            break
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, goal).backward()
        optimizer.step()
    else:
        raise AssertionError("the tiny model did not learn its answers")
    model.save_pretrained(directory)
    _taught["dir"] = directory
    return directory
