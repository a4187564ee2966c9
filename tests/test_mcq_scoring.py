"""MCQ scoring rules on tiny real models: each rule's score is the summed log-likelihood of the reply normalised
as documented (plain prompts split context and reply as lm-eval does), multi-answer questions are scored over
letter sets with partial credit apart, and generative scoring reads the letter a taught model states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from medgpt.data.records import Message
from medgpt.evaluation import EvalSpec, evaluate_model
from medgpt.evaluation.benchmarks import read_questions
from medgpt.evaluation.mcq import partial_credit
from medgpt.evaluation.mcq_prompts import candidates, chat_messages, plain_context, plain_prompt
from teaching import teach

FIXTURES = ROOT / "tests" / "fixtures" / "benchmarks"


def summed_logprob(model, ids: list[int], start: int) -> float:
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids)))


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "mcq.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("scoring", ["sum", "char", "byte", "letter"])
def test_plain_prompt_scores_are_the_replys_log_likelihood_normalised_as_documented(scoring, tiny_model_dir,
                                                                                      tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / scoring
    evaluate_model(str(tiny_model_dir), EvalSpec(mcq_file=str(FIXTURES / "mmlu"), mcq_scoring=scoring,
                                                 mcq_prompt="plain", torch_dtype="fp32"), out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for question, row in zip(read_questions(str(FIXTURES / "mmlu")).questions, rows_of(out)):
        context = plain_context(question, [], scoring)
        assert context.startswith(f"The following are multiple choice questions (with answers) about {question.subject}.")
        expected = {}
        for letter, text in question.options.items():
            reply = letter if scoring == "letter" else text
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            whole = tokenizer.encode(context + " " + reply, add_special_tokens=False)
            logprob = summed_logprob(model, context_ids + whole[len(context_ids):], len(context_ids))
            expected[letter] = logprob / {"sum": 1, "letter": 1, "char": len(reply), "byte": len(reply.encode())}[scoring]
        assert row["scores"] == pytest.approx(expected, abs=1e-4)
        assert row["predicted"] == max(expected, key=expected.get)
        assert ("A. " in context) == (scoring == "letter")  # letters are listed only when they are the reply


def test_batched_prompts_with_reused_kv_caches_score_as_each_sequence_alone(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from medgpt.evaluation.likelihood import Continuation, continuation_logprobs, shared_prompts_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tokenizer.encode(t) for t in ("Which organ pumps blood? Answer:", "Short?",
                                             "A much longer prompt about the liver, the kidneys and bile. Answer:")]
    tails = [[tokenizer.encode(t) for t in group] for group in
             ([" heart", " the lungs, surely"], [" yes", " no", " maybe not"], [" bile"])]
    batched = shared_prompts_logprobs(model, prompts, tails, tokenizer.pad_token_id)
    alone = continuation_logprobs(model, [Continuation(p + t, len(p)) for p, group in zip(prompts, tails) for t in group],
                                  tokenizer.pad_token_id)
    assert [s.tokens for group in batched for s in group] == [s.tokens for s in alone]
    assert [s.logprob for group in batched for s in group] == pytest.approx([s.logprob for s in alone], abs=1e-4)


def test_plain_prompts_follow_lm_evals_formats():
    mmlu = read_questions(str(FIXTURES / "mmlu_cais.jsonl")).questions[0]
    assert plain_prompt(mmlu, "letter") == ("Which enzyme unwinds the DNA double helix during replication?\n"
                                            "A. Ligase\nB. Helicase\nC. Primase\nD. Topoisomerase\nAnswer:")
    medmcqa = read_questions(str(FIXTURES / "medmcqa_hub.jsonl")).questions[0]
    assert plain_prompt(medmcqa, "letter").startswith("Question: Which nerve supplies the deltoid muscle?\nChoices:\nA. ")
    pubmed = read_questions(str(FIXTURES / "pubmedqa_ori_pqal.json")).questions[0]
    assert plain_prompt(pubmed, "sum") == ("Abstract: " + "\n".join(pubmed.contexts) +
                                           f"\nQuestion: {pubmed.stem}\nAnswer:")
    cmmlu = read_questions(str(FIXTURES / "cmmlu")).questions[0]
    assert plain_prompt(cmmlu, "letter").endswith("D. 小肠\n答案：")


def test_chat_letter_scoring_asks_for_the_letter_in_the_questions_language(tokenizer):
    question = read_questions(str(FIXTURES / "cmb_val.json")).questions[1]
    turn = chat_messages(question, [], "letter")[-1].content
    assert "多项选择题" in turn and "字母" in turn and "A. 定时翻身" in turn
    english = read_questions(str(FIXTURES / "medqa_hf.jsonl")).questions[0]
    assert chat_messages(english, [], "generate", cot=True)[-1].content.endswith(
        'Think it through step by step, then end with "Answer: " and the letter of the correct option.')


def test_multi_answer_questions_are_scored_over_letter_sets_with_partial_credit_apart(tiny_model_dir, tmp_path):
    out = tmp_path / "cmb"
    metrics = evaluate_model(str(tiny_model_dir), EvalSpec(mcq_file=str(FIXTURES / "cmb_val.json"),
                                                           mcq_scoring="letter"), out)
    single, multi = rows_of(out)
    assert len(single["scores"]) == 4 and len(multi["scores"]) == 31  # A-D; every non-empty set of A-E
    assert multi["predicted"] == max(multi["scores"], key=multi["scores"].get) and multi["answer"] == "ACD"
    assert multi["partial"] == partial_credit(multi["predicted"], "ACD")
    assert metrics["mcq_multi_n"] == 1 and metrics["mcq_multi_partial"] == multi["partial"]
    assert metrics["mcq_chance"] == pytest.approx((1 / 4 + 1 / 31) / 2)
    assert partial_credit("AC", "ACD") == pytest.approx(2 / 3) and partial_credit("AB", "ACD") == 0
    assert partial_credit("ACD", "ACD") == 1 and partial_credit(None, "ACD") == 0
    assert candidates(read_questions(str(FIXTURES / "cmb_val.json")).questions[0]) == list("ABCD")


def test_per_category_accuracy_has_its_own_interval(tiny_model_dir):
    metrics = evaluate_model(str(tiny_model_dir), EvalSpec(mcq_file=str(FIXTURES / "medqa_us_4options.jsonl")))
    by = metrics["mcq_by_category"]
    assert set(by) == {"step1", "step2&3"} and by["step2&3"]["n"] == 2
    assert all(0 <= c["accuracy_ci"][0] <= c["accuracy"] <= c["accuracy_ci"][1] <= 1 for c in by.values())


def test_generative_scoring_reads_the_letter_a_taught_model_states(learnable_model_dir, tokenizer, tmp_path):
    file = FIXTURES / "medqa_us_4options.jsonl"
    questions = read_questions(str(file)).questions
    replies = [Message("assistant", f"Answer: I think it is {q.answer}") for q in questions]
    taught = teach(learnable_model_dir, tokenizer, [chat_messages(q, [], "generate") + [r]
                                                    for q, r in zip(questions, replies)], tmp_path / "taught", 20)
    out = tmp_path / "eval"
    metrics = evaluate_model(str(taught), EvalSpec(mcq_file=str(file), mcq_scoring="generate",
                                                   mcq_max_new_tokens=12, torch_dtype="fp32"), out)
    rows = rows_of(out)
    assert all(r["completion"].startswith(reply.content) for r, reply in zip(rows, replies)), rows  # never "I"
    assert metrics["mcq_accuracy"] == 1.0 and metrics["mcq_unanswered"] == 0
    untaught = evaluate_model(str(learnable_model_dir), EvalSpec(mcq_file=str(file), mcq_scoring="generate"))
    assert untaught["mcq_accuracy"] < 1.0


def test_few_shot_examples_come_from_the_few_shot_file_never_the_evaluated_set(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate_model(str(tiny_model_dir), EvalSpec(mcq_file=str(FIXTURES / "mmlu"), mcq_prompt="plain",
                                                           mcq_scoring="letter", few_shot=1,
                                                           few_shot_file=str(FIXTURES / "mmlu_cais.jsonl")), out)
    assert metrics["mcq_few_shot"] == 1
    from medgpt.evaluation.run import read_mcq

    items, _ = read_mcq(EvalSpec(mcq_file=str(FIXTURES / "mmlu"), few_shot=1,
                                 few_shot_file=str(FIXTURES / "mmlu_cais.jsonl")))
    pool = {q.question for q in read_questions(str(FIXTURES / "mmlu_cais.jsonl")).questions}
    assert all(len(item.shots) == 1 and item.shots[0].question in pool for item in items)
