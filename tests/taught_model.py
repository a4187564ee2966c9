"""A tiny model taught by heart to answer a few questions, each with its own answer of its own length.

Its greedy answers are known text that ends with `<|im_end|>` at a different step per question, so a batch whose
rows were mixed up, cut at the wrong step or kept going after their end-of-turn shows in the text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TAUGHT = {
    "What is anaemia?": "Too few red blood cells.",
    "Hi": "Hello! How can I help?",
    "Name a vitamin.": "Vitamin C, found in oranges, peppers and broccoli.",
    "What helps a burn?": "Cool running water for twenty minutes, then a clean dressing. See a doctor if it blisters.",
}

# each reply token must win by this many logits: bf16 inference (the default on CPUs with bf16 matrix units)
# rounds the logits by ~0.4% and flipped a narrowly won token, so a burn got the anaemia answer
MARGIN = 2.0

_taught: dict[str, Path] = {}  # one training per test session, shared by the test modules that ask


def teach_by_heart(model, tokenizer, pairs: list[tuple[list[int], list[int]]], steps: int = 400,
                   margin: float = MARGIN) -> None:
    """Train `model` until greedy decoding of each prompt gives its reply (token ids), each token winning
    by `margin` logits, or fail.

    The embeddings (tied to the output head) stay random: the layers learn to point at the right ones, and no
    optimizer step or full-sequence logits over the 49k-token vocabulary are paid for. The pad row starts at
    zero (`padding_idx`), and pad is <|im_end|> here: a zero output row could never be the argmax.
    """
    rows = [prompt + reply for prompt, reply in pairs]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r in pairs])
    taught = target[:, 1:] != -100  # positions that predict a reply token
    goal = target[:, 1:][taught]
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[tokenizer.pad_token_id].normal_(0, 0.02)
    embeddings.requires_grad_(False)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        logits = model.lm_head(model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][taught])
        runner_up = logits.scatter(1, goal[:, None], float("-inf")).max(-1).values
        if (logits.gather(1, goal[:, None])[:, 0] - runner_up).min() > margin:  # greedy says them all, robustly
            break
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, goal).backward()
        optimizer.step()
    else:
        raise AssertionError("the tiny model did not learn its replies by heart")
    model.eval()


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
    teach_by_heart(model, tokenizer, [(chat.prompt_ids([Message("user", question)]),
                                       tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False))
                                      for question, answer in TAUGHT.items()])
    model.save_pretrained(directory)
    _taught["dir"] = directory
    return directory


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tokenizer):
    """An engine on the taught model (import this fixture into a test module to use it)."""
    from medgpt.serve.engine import GenerationEngine

    # fp32: the tests compare answers in a shared batch with the same requests alone, token for token; bf16
    # (auto on CPUs with bf16 matrix units) rounds differently for each batch shape, so free-running greedy
    # continuations of untaught prompts part (taught answers hold: MARGIN)
    engine = GenerationEngine.load(str(taught_model_dir(tmp_path_factory, tokenizer)), torch_dtype="fp32")
    yield engine
    engine.close()
