"""Packing, truncation, collators, the chunked loss and NEFTune: exact equalities against plain computations."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from medgpt.data.collators import PaddedCollator, PaddingFreeCollator, sample_lengths
from medgpt.data.processors import IGNORE, SFTStats, encode_sft, pack_documents
from medgpt.data.records import Conversation, Message, Source
from medgpt.data.templates import ChatFormat
from medgpt.models.attention import PACKED_SDPA, document_starts, register_packed_attention
from medgpt.training.loss import chunked_lm_loss
from medgpt.training.trainer import NEFTune, use_chunked_loss


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


def doc(n, start=100):
    return list(range(start, start + n))


# ------------------------------------------------------------------------------------------------ PT packing


def test_blocks_are_full_and_nothing_is_dropped():
    docs = [doc(5), doc(9, 200), doc(3, 300)]
    blocks = list(pack_documents(docs, block_size=4))
    assert [len(b["input_ids"]) for b in blocks] == [4, 4, 4, 4, 1]
    assert sum((b["input_ids"] for b in blocks), []) == sum(docs, [])


def test_positions_restart_at_each_document_and_block_and_starts_are_not_predicted():
    blocks = list(pack_documents([doc(3), doc(4, 200)], block_size=5))
    assert blocks[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert blocks[1]["position_ids"] == [0, 1]  # the rest of the second document: a fresh context
    assert blocks[0]["labels"] == [IGNORE, 101, 102, IGNORE, 201]


@pytest.mark.parametrize("attention", ["sdpa", "eager", PACKED_SDPA])
def test_packed_samples_do_not_attend_across_boundaries(tiny_model_dir, attention):
    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    first, second = doc(7, 500), doc(6, 900)
    packed = PaddingFreeCollator()([
        {"input_ids": first, "labels": first, "position_ids": list(range(7))},
        {"input_ids": second, "labels": second, "position_ids": list(range(6))},
    ])
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packed rows
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second])).logits[0]
        first_alone = model(input_ids=torch.tensor([first])).logits[0]
    torch.testing.assert_close(together[7:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:7], first_alone, atol=1e-5, rtol=1e-5)


def test_per_document_attention_equals_the_block_diagonal_mask_in_training(tiny_model_dir):
    """Same loss and same gradients as transformers' block-diagonal SDPA mask, with dropout off."""
    register_packed_attention()
    samples = [{"input_ids": doc(n, 100 * i), "labels": doc(n, 100 * i), "position_ids": list(range(n))}
               for i, n in enumerate([11, 4, 17, 1, 9], start=1)]
    batch = PaddingFreeCollator()(samples)
    results = []
    for attention in ("sdpa", PACKED_SDPA):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
        assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query heads too
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_per_document_attention_honours_a_sliding_window_inside_each_document(monkeypatch):
    """A tiny Mistral with window 4 and a packed document of 11 tokens: each document's logits equal the stock
    model's on that document alone, and equal transformers' own packed mask; a window that really cuts."""
    from transformers import MistralConfig, MistralForCausalLM

    register_packed_attention()
    config = MistralConfig(vocab_size=1200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           max_position_embeddings=64)
    torch.manual_seed(0)
    stock = MistralForCausalLM(config).eval()
    packed_model = MistralForCausalLM(config).eval()
    packed_model.load_state_dict(stock.state_dict())
    packed_model.config._attn_implementation = PACKED_SDPA
    first, second = doc(11, 500), doc(3, 900)
    row = PaddingFreeCollator()([{"input_ids": first, "labels": first, "position_ids": list(range(11))},
                                 {"input_ids": second, "labels": second, "position_ids": list(range(3))}])
    inputs = {"input_ids": row["input_ids"], "position_ids": row["position_ids"], "use_cache": False}
    import transformers.integrations.sdpa_attention as stock_sdpa

    fallbacks = []
    real = stock_sdpa.sdpa_attention_forward
    monkeypatch.setattr(stock_sdpa, "sdpa_attention_forward", lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    with torch.no_grad():
        ours = packed_model(**inputs).logits[0]
        assert not fallbacks  # the per-document path ran, window and all, not the whole-row mask
        theirs = stock(**inputs).logits[0]
        alone = [stock(input_ids=torch.tensor([d])).logits[0] for d in (first, second)]
        unwindowed = MistralForCausalLM(MistralConfig(**{**config.to_dict(), "sliding_window": None})).eval()
        unwindowed.load_state_dict(stock.state_dict())
        full = unwindowed(input_ids=torch.tensor([first])).logits[0]
    torch.testing.assert_close(ours[:11], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[11:], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert float((full[4:] - alone[0][4:]).abs().max()) > 1e-3  # beyond the window it would differ


def test_document_boundaries_are_read_once_per_forward_not_once_per_layer(tiny_model_dir, monkeypatch):
    import medgpt.models.attention as attention

    register_packed_attention()
    reads = []
    real = attention._row_starts
    monkeypatch.setattr(attention, "_row_starts", lambda row: reads.append(1) or real(row))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=PACKED_SDPA)
    assert model.config.num_hidden_layers > 1
    batch = PaddingFreeCollator()([{"input_ids": doc(5), "labels": doc(5), "position_ids": list(range(5))},
                                   {"input_ids": doc(4, 60), "labels": doc(4, 60), "position_ids": list(range(4))}])
    model(**batch, use_cache=False).loss.backward()
    assert len(reads) == 1


def test_flash_varlen_arguments_come_from_the_packed_row_once():
    from medgpt.models.attention import flash_packed_kwargs

    kwargs = flash_packed_kwargs(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4
    assert flash_packed_kwargs(torch.tensor([[0, 1, 2]])) == {}  # one document: nothing to split


def test_per_document_attention_leaves_padded_batches_and_generation_alone(tiny_model_dir):
    register_packed_attention()
    assert document_starts(torch.tensor([[0, 1, 2, 0, 1]])) == [0, 3]
    assert document_starts(torch.tensor([[0, 1, 2, 3]])) is None  # one document: plain SDPA
    assert document_starts(torch.tensor([[1, 1, 0, 1]])) is None  # left-padded generation prompt
    assert document_starts(torch.tensor([[0, 1, 0], [0, 1, 2]])) is None  # a padded batch
    with torch.inference_mode():  # generation: tensors without a version counter
        assert document_starts(torch.tensor([[0, 1, 0, 1]])) == [0, 2]
    padded = PaddedCollator(pad_token_id=0)([{"input_ids": doc(6), "labels": doc(6), "position_ids": list(range(6))},
                                             {"input_ids": doc(3, 50), "labels": doc(3, 50), "position_ids": [0, 1, 2]}])
    prompt = torch.tensor([doc(5, 40)])
    outputs = {}
    for attention in ("sdpa", PACKED_SDPA):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
        with torch.no_grad():
            logits = model(**padded).logits
            generated = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        outputs[attention] = logits, generated
    torch.testing.assert_close(outputs["sdpa"][0], outputs[PACKED_SDPA][0], atol=1e-6, rtol=1e-6)
    assert torch.equal(outputs["sdpa"][1], outputs[PACKED_SDPA][1])


def test_padding_free_collator_masks_each_samples_first_token():
    batch = PaddingFreeCollator()([
        {"input_ids": [1, 2, 3], "labels": [5, 6, 7], "position_ids": [0, 1, 2]},
        {"input_ids": [4, 5], "labels": [8, 9], "position_ids": [0, 1]},
    ])
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in batch  # its absence makes transformers build the block-diagonal mask


def test_padded_collator_pads_right_and_masks_padding():
    batch = PaddedCollator(pad_token_id=0)([
        {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "position_ids": [0, 1, 2]},
        {"input_ids": [4], "labels": [IGNORE], "position_ids": [0]},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]


def test_sample_lengths_for_packed_rows_and_padded_batches():
    assert sample_lengths(torch.tensor([[0, 1, 2, 0, 1]])).tolist() == [[3, 3, 3, 2, 2]]
    padded = sample_lengths(torch.tensor([[0, 1, 2], [0, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert padded.tolist() == [[3, 3, 3], [1, 0, 0]]


# ------------------------------------------------------------------------------------------------ SFT


def conversation(*turns):
    roles = ["user", "assistant"] * len(turns)
    return Conversation([Message(r, t) for r, t in zip(roles, turns)], Source("test", 1))


def test_sft_labels_are_the_assistant_mask(tokenizer):
    chat = ChatFormat(tokenizer)
    record = conversation("What lowers fever?", "Paracetamol can lower fever.")
    feature = encode_sft(chat, record, max_length=512)
    encoded = chat.encode(record.messages)
    assert feature["input_ids"] == encoded.input_ids
    assert feature["labels"] == [t if m else IGNORE for t, m in zip(encoded.input_ids, encoded.assistant_mask)]
    assert feature["position_ids"] == list(range(len(encoded.input_ids)))


def test_truncation_keeps_whole_turns_with_their_end_of_turn(tokenizer):
    chat = ChatFormat(tokenizer)
    record = conversation("Q one?", "Answer one.", "Q two?", "A much longer second answer " * 20)
    encoded = chat.encode(record.messages)
    limit = encoded.turn_ends[0] + 5  # the first reply fits, the second does not
    stats = SFTStats()
    feature = encode_sft(chat, record, max_length=limit, stats=stats)
    assert len(feature["input_ids"]) == encoded.turn_ends[0]
    assert feature["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert feature["labels"][-1] == feature["input_ids"][-1]  # the end-of-turn is still learned
    assert stats.counts["truncated_at_turn"] == 1


def test_first_reply_too_long_is_cut_without_a_fake_end_of_turn(tokenizer):
    chat = ChatFormat(tokenizer)
    record = conversation("Explain.", "word " * 300)
    stats = SFTStats()
    feature = encode_sft(chat, record, max_length=64, stats=stats)
    assert len(feature["input_ids"]) == 64
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") != feature["input_ids"][-1]
    assert stats.counts["truncated_in_reply"] == 1


def test_prompt_longer_than_max_length_is_dropped_and_counted(tokenizer):
    chat = ChatFormat(tokenizer)
    stats = SFTStats()
    assert encode_sft(chat, conversation("long " * 200, "ok"), max_length=32, stats=stats) is None
    assert stats.counts["dropped"] == 1 and "1 dropped" in stats.line()


# ------------------------------------------------------------------------------------------------ loss


def test_chunked_loss_equals_the_plain_loss_and_gradients(tiny_model_dir):
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (2, 24))
    labels = ids.clone()
    labels[0, :10] = IGNORE  # a prompt
    labels[1, 20:] = IGNORE  # padding
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chunked = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    use_chunked_loss(chunked, chunk_size=7)  # several chunks, last one partial
    reference = plain(input_ids=ids, labels=labels).loss
    ours = chunked(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    reference.backward()
    ours.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_loss_divides_by_tokens_across_accumulated_batches():
    hidden = torch.randn(1, 5, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[IGNORE, 1, 2, 3, IGNORE]])
    mean, count = chunked_lm_loss(hidden, labels, head)
    summed, _ = chunked_lm_loss(hidden, labels, head, num_items=1)
    assert count == 3
    torch.testing.assert_close(summed / 3, mean)


def test_forward_without_labels_still_gives_logits(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    use_chunked_loss(model)
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[:2] == (1, 3)


# ------------------------------------------------------------------------------------------------ NEFTune


def test_neftune_scales_noise_by_each_samples_own_length(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    embeddings = model.get_input_embeddings()
    neftune = NEFTune(model, alpha=5.0)
    ids = torch.tensor([list(range(100, 116))])
    positions = torch.tensor([list(range(4)) + list(range(12))])  # samples of 4 and 12 tokens in one row
    neftune.lengths = sample_lengths(positions)
    clean = embeddings.weight[ids].detach()
    embeddings.train()
    noise = (embeddings(ids) - clean).abs().detach()[0]
    dim = clean.shape[-1]
    assert noise[:4].max() <= 5.0 / (4 * dim) ** 0.5 + 1e-6
    assert noise[4:].max() <= 5.0 / (12 * dim) ** 0.5 + 1e-6
    assert noise[:4].max() > 5.0 / (12 * dim) ** 0.5  # the short sample really got its larger scale
    embeddings.eval()
    assert torch.equal(embeddings(ids), clean)  # no noise outside training
    neftune.remove()


def test_training_loss_on_a_packed_row_equals_the_losses_of_its_samples_alone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    use_chunked_loss(model)
    samples = [{"input_ids": doc(9, 300), "labels": doc(9, 300), "position_ids": list(range(9))},
               {"input_ids": doc(5, 700), "labels": doc(5, 700), "position_ids": list(range(5))}]
    with torch.no_grad():
        packed = model(**PaddingFreeCollator()(samples)).loss
        alone = [model(**PaddingFreeCollator()([s])).loss for s in samples]
    # 8 and 4 predicted tokens: the packed mean is the token-weighted mean of the separate means
    torch.testing.assert_close(packed, (alone[0] * 8 + alone[1] * 4) / 12, atol=1e-5, rtol=1e-5)
