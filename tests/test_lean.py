"""Lean activations: the same loss and gradients as the stock forward, with fewer tensors kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from medgpt.models import lean
from medgpt.models.attention import PACKED_SDPA, register_packed_attention
from medgpt.models.lean import Recompute, use_lean_activations

LAYERS = 2  # tiny_model_dir: 2 layers, 4 query heads over 2 key/value heads


def load(model_dir, attention: str, lora: bool):
    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        for name, param in model.named_parameters():  # non-zero B: the adapters take part in the gradients
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    return model.train()


def packed_row():
    torch.manual_seed(1)
    ids = torch.randint(5, 500, (1, 23))
    positions = torch.tensor([list(range(9)) + list(range(8)) + list(range(6))])
    return {"input_ids": ids, "position_ids": positions, "labels": ids}


def padded_batch():
    torch.manual_seed(2)
    ids = torch.randint(5, 500, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def recipes(monkeypatch):
    """Counts the tensors rebuilt from a recipe during backward."""
    rebuilt = []
    original = lean._unpack

    def counting(packed):
        if isinstance(packed, lean._Recipe):
            rebuilt.append(tuple(packed.size))
        return original(packed)

    monkeypatch.setattr(lean, "_unpack", counting)
    return rebuilt


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("attention, make_batch", [(PACKED_SDPA, packed_row), ("sdpa", padded_batch)],
                         ids=["packed", "padded"])
def test_same_loss_and_gradients_as_the_stock_forward(tiny_model_dir, recipes, lora, attention, make_batch):
    stock = load(tiny_model_dir, attention, lora)
    leaner = copy.deepcopy(stock)
    assert use_lean_activations(leaner) == LAYERS
    batch = make_batch()
    loss, grads = loss_and_grads(stock, batch)
    assert not [size for size in recipes if size[-1] == stock.config.intermediate_size]  # stock MLPs keep all
    recipes.clear()
    lean_loss, lean_grads = loss_and_grads(leaner, batch)
    torch.testing.assert_close(lean_loss, loss, rtol=0, atol=0)
    assert grads.keys() == lean_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(lean_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    # Per layer the MLP rebuilds act(gate) and the product; packed GQA attention also the expanded keys/values.
    mlp = [size for size in recipes if size[-1] == stock.config.intermediate_size]
    assert len(mlp) >= 2 * LAYERS
    expanded = [size for size in recipes if len(size) == 4]  # (batch, heads, tokens, head_dim) per document
    assert len(expanded) == (2 * 3 * LAYERS if attention == PACKED_SDPA else 0)  # keys and values, 3 documents


def test_under_autocast_the_rebuilt_tensors_are_the_forwards(tiny_model_dir, recipes):
    stock = load(tiny_model_dir, PACKED_SDPA, lora=True)
    leaner = copy.deepcopy(stock)
    use_lean_activations(leaner)
    batch = packed_row()
    results = []
    for model in (stock, leaner):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward in bf16, the backward outside it
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert any(size[-1] == stock.config.intermediate_size for size in recipes)
    (loss, grads), (lean_loss, lean_grads) = results
    torch.testing.assert_close(lean_loss, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(lean_grads[name], grads[name], rtol=0, atol=0, msg=name)


def test_under_activation_checkpointing_nothing_is_recomputed_twice(tiny_model_dir, recipes):
    stock = load(tiny_model_dir, PACKED_SDPA, lora=False)
    leaner = copy.deepcopy(stock)
    use_lean_activations(leaner)
    for model in (stock, leaner):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = packed_row()
    loss, grads = loss_and_grads(stock, batch)
    lean_loss, lean_grads = loss_and_grads(leaner, batch)
    assert not recipes  # checkpointing's own hooks decide what is kept; ours stay out
    torch.testing.assert_close(lean_loss, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(lean_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_views_of_a_recomputed_result_are_rebuilt_as_the_same_views(recipes):
    x = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=True)
    with Recompute() as saved:
        y = saved.derive(torch.tanh(x) * 1.0, torch.tanh, x)
        out = (y[1:].reshape(3, 4) @ w).square().sum()  # mm keeps an offset 2-D view of y for w's gradient
    grads = torch.autograd.grad(out, (x, w))
    assert recipes == [(3, 4)]
    expected = torch.autograd.grad((torch.tanh(x)[1:].reshape(3, 4) @ w).square().sum(), (x, w))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_the_standard_gated_mlp_is_replaced(tiny_model_dir):
    class Different(torch.nn.Module):  # same attribute names, another computation: must be left alone
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(4, 4)
            self.act_fn = torch.nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    class MoreAfter(Different):  # the very expression, then dropout (transformers' SeedOssMLP): also left alone
        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            down_proj = torch.nn.functional.dropout(down_proj, p=0.1, training=self.training)
            return down_proj

    assert use_lean_activations(Different()) == 0
    assert use_lean_activations(MoreAfter()) == 0
    model = load(tiny_model_dir, "sdpa", lora=False)
    assert use_lean_activations(model) == LAYERS
    assert use_lean_activations(model) == 0  # idempotent
