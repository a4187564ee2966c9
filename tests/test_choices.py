"""The one answer-letter extractor (shared by generative MCQ and the RL choice_match reward) and the intervals:
Wilson against its textbook values, bootstrap and paired tests that see a real difference and not a null one."""

from __future__ import annotations

import pytest

from medgpt.evaluation.choices import answer_letters
from medgpt.evaluation.intervals import bootstrap_mean, mcnemar, paired_difference, paired_ratio_of_sums, wilson
from medgpt.rl import rewards


@pytest.mark.parametrize("text, letters", [
    ("Answer: I think it is C", "C"),
    ("The answer is A. Wait, no: the answer is C.", "C"),  # the last stated choice wins
    ("Option A is wrong; option C is correct.", "C"),
    ("**Answer:** (B)", "B"),
    ("I'd go with A", "A"),
    ("It is B", "B"),
    ("Reasoning about each option...\nD", "D"),
    ("The answer is C and I am sure", "C"),  # "I" followed by a word is the pronoun
    ("The correct answers are A and C.", "AC"),
    ("答案是C", "C"), ("答案：A、B、D", "ABD"), ("故选B", "B"), ("选 ABD", "ABD"), ("B项正确", "B"),
    ("Ａnswer: Ｂ", "B"),  # full-width forms
    ("Vitamin A deficiency causes night blindness", None),
    ("Answer: Dopamine", None),
    ("ANSWER: I", None),  # the letters A-H when the question's are unknown
    ("I think it is insulin", None),
])
def test_answer_letters_reads_the_stated_choice(text, letters):
    assert answer_letters(text) == letters


def test_only_the_questions_letters_count():
    assert answer_letters("Answer: E", "ABCD") is None
    assert answer_letters("Answer: I", "ABCDEFGHIJ") == "I"  # a question with an option I
    assert answer_letters("Answer: I think it is J", "ABCDEFGHIJ") == "J"


def test_choice_match_uses_the_extractor_and_gives_nothing_for_hedging():
    completions = [[{"role": "assistant", "content": t}] for t in
                   ("Answer: I think it is C", "The answer is B or C", "答案：ACD", "ACD")]
    got = rewards.choice_match(completions, reference=["C", "C", "DCA", "ACD"], reference_kind=["choice"] * 4)
    assert got == [1.0, 0.0, 1.0, 1.0]


def test_wilson_matches_the_textbook_interval_and_stays_inside_zero_one():
    assert wilson(50, 117) == pytest.approx([0.34143, 0.51789], abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(10, 10)[0] > 0.6
    assert wilson(0, 0) == [0.0, 1.0]


def test_bootstrap_and_paired_tests_tell_a_real_difference_from_noise():
    low, high = bootstrap_mean([1, 0.5, 0, 1] * 10)
    assert low < 0.625 < high and bootstrap_mean([1, 0.5, 0, 1] * 10) == [low, high]  # seeded
    clear = paired_difference([1.0] * 40, [0.0] * 30 + [1.0] * 10)
    assert clear["real"] and clear["difference"] == pytest.approx(0.75)
    same = paired_difference([1.0, 0.0] * 20, [0.0, 1.0] * 20)
    assert not same["real"] and same["difference_ci"][0] < 0 < same["difference_ci"][1]
    test = mcnemar([True] * 10 + [False] * 2, [False] * 10 + [True] * 2)
    assert (test["only_a"], test["only_b"]) == (10, 2) and test["p_value"] == pytest.approx(2 * 79 / 4096)
    ratio = paired_ratio_of_sums([(10.0, 5)] * 20, [(12.0, 5)] * 20)
    assert ratio["difference"] == pytest.approx(-0.4) and ratio["real"]
