"""The chunked causal-LM loss on architectures that post-process their logits or add a router loss: equal to the
stock loss and gradients (Cohere logit_scale, Granite logits_scaling, Gemma 2 final softcapping, Falcon-H1
lm_head_multiplier, Qwen3-MoE router loss); the stock path, with a log line, where the forward does something it cannot read; deep copies; batches
with no trained token."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from medgpt.data.processors import IGNORE
from medgpt.models.output_head import Unsupported, read_output_head
from medgpt.training.loss import chunked_lm_loss
from medgpt.training.trainer import use_chunked_loss

SHAPE = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def cohere():
    return CohereForCausalLM(CohereConfig(**SHAPE, logit_scale=0.37))


def granite():
    return GraniteForCausalLM(GraniteConfig(**SHAPE, logits_scaling=3.5))


def gemma2():
    return Gemma2ForCausalLM(Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=0.05, sliding_window=16,
                                          attn_implementation="eager"))


def falcon_h1():  # hybrid attention + Mamba; lm_head_multiplier lives on the decoder (`self.model`)
    from transformers import FalconH1Config, FalconH1ForCausalLM

    return FalconH1ForCausalLM(FalconH1Config(**{**SHAPE, "num_hidden_layers": 1}, head_dim=8, mamba_d_ssm=32,
                                              mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
                                              lm_head_multiplier=0.25))


def qwen3_moe():
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPE, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=16, output_router_logits=True,
                                              router_aux_loss_coef=0.5))


def pair(build):
    torch.manual_seed(0)
    model = build()
    return model, copy.deepcopy(model)


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 20), generator=generator)
    labels = ids.clone()
    labels[0, :6] = IGNORE
    labels[1, 15:] = IGNORE
    return ids, labels


@pytest.mark.parametrize("build, steps", [
    (cohere, [("mul", 0.37)]),
    (granite, [("div", 3.5)]),
    (gemma2, [("div", 0.05), ("tanh", 0.0), ("mul", 0.05)]),
    (qwen3_moe, []),
    (falcon_h1, [("mul", 0.25)]),
], ids=["cohere", "granite", "gemma2", "qwen3_moe", "falcon_h1"])
def test_chunked_loss_equals_the_stock_loss_and_gradients(build, steps):
    stock, chunked = pair(build)
    assert list(read_output_head(chunked).steps) == steps
    assert use_chunked_loss(chunked, chunk_size=5)
    ids, labels = batch()
    reference = stock(input_ids=ids, labels=labels)
    ours = chunked(input_ids=ids, labels=labels)
    plain_ce = chunked_lm_loss(stock.get_decoder()(input_ids=ids).last_hidden_state, labels, stock.lm_head)[0]
    assert abs(float(reference.loss) - float(plain_ce)) > 1e-3  # the logit steps (or router loss) matter here
    torch.testing.assert_close(ours.loss, reference.loss, atol=1e-5, rtol=1e-5)
    reference.loss.backward()
    ours.loss.backward()
    for (name, a), (_, b) in zip(stock.named_parameters(), chunked.named_parameters()):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_moe_router_loss_is_kept_and_follows_output_router_logits():
    stock, chunked = pair(qwen3_moe)
    use_chunked_loss(chunked)
    assert read_output_head(chunked).router_aux_loss_coef == 0.5
    ids, labels = batch()
    with torch.no_grad():
        with_router = chunked(input_ids=ids, labels=labels).loss
        without = chunked(input_ids=ids, labels=labels, output_router_logits=False).loss
        stock_without = stock(input_ids=ids, labels=labels, output_router_logits=False).loss
    torch.testing.assert_close(without, stock_without, atol=1e-5, rtol=1e-5)
    assert float(with_router - without) > 0.1  # 0.5 x a load-balancing loss of about num_experts_per_tok


def test_softcapping_turned_off_in_the_config_gives_no_softcap_step():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=None))
    assert read_output_head(model).steps == ()


class ClampedLogits(LlamaForCausalLM):
    """A forward that changes its logits in a way the reader does not know."""

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        hidden_states = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.lm_head(hidden_states)
        logits = logits.clamp(-1.0, 1.0)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_an_unknown_logit_step_falls_back_to_the_stock_loss_with_a_log_line(caplog):
    torch.manual_seed(0)
    model = ClampedLogits(LlamaConfig(**SHAPE))
    with pytest.raises(Unsupported, match="clamp"):
        read_output_head(model)
    with caplog.at_level(logging.INFO):
        assert not use_chunked_loss(model)
    assert "stock causal-LM loss" in caplog.text and "clamp" in caplog.text
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None  # the stock forward, untouched


def test_a_deep_copy_with_the_chunked_loss_runs_its_own_weights():
    torch.manual_seed(0)
    original = LlamaForCausalLM(LlamaConfig(**SHAPE))
    use_chunked_loss(original)
    clone = copy.deepcopy(original)
    with torch.no_grad():
        for param in clone.parameters():
            param.mul_(1.5)
    ids, labels = batch()
    with torch.no_grad():
        assert abs(float(clone(input_ids=ids, labels=labels).loss) - float(original(input_ids=ids, labels=labels).loss)) > 1e-3
        stock_clone = copy.deepcopy(clone)
        del stock_clone.forward, stock_clone._medgpt_stock_forward
        torch.testing.assert_close(clone(input_ids=ids, labels=labels).loss,
                                   stock_clone(input_ids=ids, labels=labels).loss, atol=1e-5, rtol=1e-5)
    clone(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in original.parameters())
    assert all(p.grad is not None for p in clone.parameters())


def test_a_batch_with_no_trained_token_gives_a_zero_loss_with_gradients_for_every_parameter():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    use_chunked_loss(model)
    ids = torch.randint(3, 300, (1, 6))
    for labels in (torch.full_like(ids, IGNORE), ids[:, :1].clone()):  # all masked; a 1-token PT block
        inputs = ids if labels.shape == ids.shape else ids[:, :1]
        loss = model(input_ids=inputs, labels=labels).loss
        assert float(loss) == 0.0 and loss.requires_grad
        model.zero_grad()
        loss.backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in model.parameters())
    zero_items, _ = chunked_lm_loss(torch.randn(1, 4, 8, requires_grad=True), torch.full((1, 4), IGNORE),
                                    torch.nn.Linear(8, 5), num_items=torch.tensor(0))
    assert torch.isfinite(zero_items)  # a step whose micro-batches are all empty divides by 1, not 0
