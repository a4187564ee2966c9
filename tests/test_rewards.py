"""Reward functions on real strings, called the way TRL calls them (prompts, completions, completion_ids and the
dataset's columns as keyword arguments), plus a user's module:function and the reward model as a reward."""

from __future__ import annotations

import pytest
import torch

from medgpt.data.records import Message
from medgpt.evaluation.choices import answer_letters
from medgpt.rl import rewards


def chat(*texts: str) -> list[list[dict]]:
    """Completions as TRL passes them for conversational prompts."""
    return [[{"role": "assistant", "content": t}] for t in texts]


def score(function, completions, references, kinds=None, **kwargs):
    kinds = kinds or ["text"] * len(references)
    return function(prompts=[[{"role": "user", "content": "q"}]] * len(completions), completions=completions,
                    completion_ids=[[1, 2]] * len(completions), reference=references, reference_kind=kinds, **kwargs)


# ------------------------------------------------------------------------------------------------ key terms


def test_key_terms_drop_function_words_and_plurals_and_split_chinese_by_character():
    assert rewards.key_terms("The kidneys filter the Blood.") == ["kidney", "filter", "blood"]
    assert rewards.key_terms("Do not take aspirin") == ["¬take", "¬aspirin"]  # negations carry meaning
    assert rewards.key_terms("60 to 100 beats per minute") == ["60", "100", "beat", "minute"]
    assert rewards.key_terms("胰岛素是降血糖的") == ["胰", "岛", "素", "降", "血", "糖"]
    assert rewards.key_terms("diabetes, glass") == ["diabete", "glass"]  # one stem for both sides


def test_answer_f1_scores_free_text_against_the_reference():
    refs = ["Insulin"] * 4
    got = score(rewards.answer_f1, chat("Insulin.", "Insulin, made by the pancreas, lowers glucose.",
                                        "Glucagon raises it.", ""), refs)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(2 * (1 / 5) * 1 / (1 / 5 + 1))  # 1 of 5 answer terms, the 1 reference term
    assert got[2] == 0.0 and got[3] == 0.0


def test_negation_changes_the_terms_to_the_end_of_the_clause():
    f1 = lambda answer, reference: score(rewards.answer_f1, chat(answer), [reference])[0]  # noqa: E731
    assert f1("not the liver", "the liver") == 0.0  # was 0.67: "not" was just one more term
    assert f1("Not the liver.", "not the liver") == 1.0
    assert f1("It isn't the liver, it is the spleen", "the spleen") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1("不是肝脏", "肝脏") == 0.0 and f1("是肝脏", "肝脏") == 1.0
    assert f1("非常严重", "严重") == 1.0  # 非常 is "very", not a negation
    assert rewards.key_terms("No.") == ["not"] and rewards.key_terms("no fever, but a cough") == ["¬fever", "cough"]


def test_answer_recall_rewards_mentioning_every_key_term_in_english_and_chinese():
    refs = ["60 to 100 beats per minute", "60 to 100 beats per minute", "胰岛素"]
    got = score(rewards.answer_recall, chat("A resting adult heart beats 60-100 times a minute, 60–100 beats.",
                                            "About 60 beats.", "答案是胰岛素。"), refs)
    assert got == [1.0, pytest.approx(2 / 4), 1.0]


def test_answer_rewards_score_only_the_answer_block_of_a_reasoning_completion():
    text = "<think>Glucagon? No, the hormone is insulin.</think>\n<answer>Insulin</answer>"
    assert score(rewards.answer_f1, chat(text), ["Insulin"]) == [1.0]
    assert score(rewards.answer_f1, ["<think>liver or kidney</think> The liver"], ["The liver"]) == [1.0]


def test_rows_without_a_reference_get_none_so_trl_leaves_them_out():
    assert score(rewards.answer_f1, chat("Insulin"), [None], ["none"]) == [None]
    assert score(rewards.choice_match, chat("B"), ["Insulin"], ["text"]) == [None]


# ------------------------------------------------------------------------------------------------ choices


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("B. Insulin", "B"), ("(C) the liver", "C"), ("The answer is D.", "D"), ("Answer: a", None),
    ("answer: A", "A"), ("答案是B", "B"), ("答案：C", "C"), ("A fever is a raised temperature", None),
    ("I think it is insulin", None),
])
def test_chosen_letter_reads_common_answer_forms(answer, letter):
    assert answer_letters(answer) == letter  # the evaluation's extractor, which choice_match uses


def test_choice_rows_are_scored_by_exact_letter_match_in_every_answer_reward():
    completions = chat("Answer: B", "C", "I am not sure")
    for function in (rewards.choice_match, rewards.answer_f1, rewards.answer_recall):
        assert score(function, completions, ["B", "b", "B"], ["choice"] * 3) == [1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------ format, length


def test_format_reward_needs_the_whole_completion_in_the_pattern():
    good = "<think>fever means infection or inflammation</think>\n<answer>See a doctor</answer>  "
    got = rewards.format_reward(completions=chat(good, "<answer>x</answer>", good + " extra"))
    assert got == [1.0, 0.0, 0.0]
    assert rewards.format_reward(completions=["Yes."], pattern=r"[A-Z].*\.") == [1.0]


def test_length_penalty_is_zero_to_start_then_falls_linearly_to_minus_one():
    ids = [[0] * n for n in (3, 10, 15, 20, 30)]
    assert rewards.length_penalty(completion_ids=ids, start=10, limit=20) == [0.0, 0.0, -0.5, -1.0, -1.0]


# ------------------------------------------------------------------------------------------------ user functions


def test_user_function_is_imported_from_a_file_or_a_module(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text("def polite(completions, **kw):\n    return [float('please' in c) for c in completions]\n")
    from_file = rewards.load_user_function(f"{path}:polite")
    assert from_file(completions=["please rest", "rest"]) == [1.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.load_user_function("my_rewards:polite")(completions=["please"]) == [1.0]


@pytest.mark.parametrize("spec,match", [
    ("nonsense", "not a built-in"), ("missing_file.py:f", "no such file"), ("math:no_such_function", "has no function"),
])
def test_bad_user_function_specs_say_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        rewards.load_user_function(spec)


# ------------------------------------------------------------------------------------------------ reward model


def test_reward_model_scores_token_ids_when_it_reads_the_policys_tokens_and_rerenders_otherwise(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from medgpt.data.records import Source
    from medgpt.data.templates import ChatFormat
    from medgpt.models.reward import RewardModelScorer
    from medgpt.rl.prompts import Prompt
    from medgpt.rl.reward_adapter import ModelReward
    from medgpt.rl.scoring import Replies

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.5)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer.load(str(tmp_path / "rm"))
    policy = ChatFormat(tokenizer)
    tools = [{"name": "lookup", "description": "look a drug up", "parameters": {}}]
    prompts = [Prompt([Message("system", "You are a careful nurse."), Message("user", "Is 39 °C a fever?")],
                      Source("t", 1), tools), Prompt([Message("user", "Is 39 °C a fever?")], Source("t", 2))]
    texts = ["Yes, it is.", "Yes."]
    end = policy.stop_token_ids()[0]
    ids = [tokenizer.encode(texts[0], add_special_tokens=False) + [end],  # ended
           tokenizer.encode(texts[1], add_special_tokens=False)]  # cut off: the scorer closes the turn itself
    replies = Replies(prompts, [policy.prompt_ids(p.messages, p.tools) for p in prompts], ids, texts)
    expected = scorer.score([[*p.messages, Message("assistant", t)] for p, t in zip(prompts, texts)], [tools, None])
    reward = ModelReward(scorer, policy)
    assert reward(replies) == pytest.approx(expected) and len(set(expected)) == 2
    assert (reward.from_ids, reward.from_text) == (2, 0)

    chatml_scorer = RewardModelScorer.load(str(tmp_path / "rm"), template="llama3")  # renders prompts otherwise
    rerendered = ModelReward(chatml_scorer, policy)
    assert rerendered(replies) == pytest.approx(chatml_scorer.score(
        [[*p.messages, Message("assistant", t)] for p, t in zip(prompts, texts)], [tools, None]))
    assert (rerendered.from_ids, rerendered.from_text) == (0, 2)
