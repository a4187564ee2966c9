"""Evaluation on tiny random models and the demo eval files: perplexity is exp of the HF loss over the same
tokens, the MCQ choice is the option with the best log-likelihood per reply token, few-shot prompts never show
the item itself, reward accuracy and win rate equal the scorer's own numbers (with intervals), adapters load, and
`medgpt eval` writes its outputs or fails with file:line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import DEMO
from teaching import teach
from medgpt.arguments import ModelArguments
from medgpt.cli import main
from medgpt.config import ConfigError
from medgpt.data.readers import read_records
from medgpt.data.records import InvalidDataError, MCQRecord, Message, Source
from medgpt.data.templates import ChatFormat
from medgpt.evaluation import EvalSpec, evaluate_model, reward_win_rate
from medgpt.evaluation.benchmarks import Question
from medgpt.evaluation.intervals import wilson
from medgpt.evaluation.mcq import MCQItem, chat_candidate
from medgpt.evaluation.mcq_prompts import chat_messages, few_shot_examples
from medgpt.models.reward import RewardModelScorer
from medgpt.rl.prompts import mcq_question

MCQS = [
    {"question": "Which organ pumps blood around the body?",
     "options": {"A": "The lungs", "B": "The heart", "C": "The liver", "D": "The kidneys"}, "answer": "B"},
    {"question": "Which vitamin does sunlight help the skin make?",
     "options": {"A": "Vitamin D", "B": "Vitamin C", "C": "Vitamin K", "D": "Vitamin B12"}, "answer": "A"},
    {"question": "What does a glucometer measure?",
     "options": {"A": "Blood pressure", "B": "Heart rate", "C": "Blood sugar", "D": "Oxygen saturation"},
     "answer": "C"},
    {"question": "Which bone is in the thigh?",
     "options": {"A": "The radius", "B": "The tibia", "C": "The humerus", "D": "The femur"}, "answer": "D"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    """A reward model (random score head on the tiny Llama) saved as `medgpt rm` saves a full model."""
    from medgpt.models.load import load_model

    torch.manual_seed(0)
    model = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir)), tokenizer,
                       head="sequence_classification")
    directory = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def reply_mean_logprob(model, tokenizer, messages: list[dict]) -> float:
    """Per-token log-likelihood of the last reply through its <|im_end|>, rendered by the tokenizer itself."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    end = max(i for i, t in enumerate(full) if t == tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1
    assert full[:len(prompt)] == prompt
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([full[:end]])).logits[0].float().log_softmax(-1)
    picked = [logprobs[i - 1, full[i]].item() for i in range(len(prompt), end)]
    return sum(picked) / len(picked)


# ------------------------------------------------------------------------------------------------ perplexity


def hand_perplexity(model, tokenizer, texts: list[str], max_length: int) -> tuple[float, int]:
    """exp of the HF causal-LM loss, weighted by the tokens each document predicts."""
    total = tokens = 0
    for text in texts:
        ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        total, tokens = total + loss * (len(ids) - 1), tokens + len(ids) - 1
    return math.exp(total / tokens), tokens


TEXTS = ["Aspirin thins the blood and can irritate the stomach.",
         ("The liver makes bile, stores glycogen and clears many drugs from the blood. " * 4).strip(),
         "Fever is a raised body temperature."]


def test_perplexity_is_exp_of_the_token_weighted_hf_loss_of_each_document_alone(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    metrics = evaluate_model(str(tiny_model_dir), EvalSpec(perplexity_file=str(held_out), max_length=40, batch_size=2,
                                                             torch_dtype="fp32"))  # exact: auto is bf16 on bf16 CPUs
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected, tokens = hand_perplexity(model, tokenizer, TEXTS, 40)
    assert metrics["perplexity_tokens"] == tokens and metrics["perplexity_docs"] == 3
    assert metrics["perplexity_truncated"] == 1  # the long document keeps its first 40 tokens
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_an_adapter_directory_is_evaluated_on_its_base(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a non-zero adapter, so it changes the perplexity
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    spec = EvalSpec(perplexity_file=str(held_out), max_length=64, torch_dtype="fp32")  # exact (auto: bf16 on bf16 CPUs)
    got = evaluate_model(str(tmp_path / "adapter"), spec)["perplexity"]
    expected, _ = hand_perplexity(model.eval(), tokenizer, TEXTS, 64)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(evaluate_model(str(tiny_model_dir), spec)["perplexity"], rel=1e-3)


# ------------------------------------------------------------------------------------------------ multiple choice


def test_mcq_picks_the_option_with_the_best_log_likelihood_per_reply_token(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "eval"
    spec = EvalSpec(mcq_file=str(write_jsonl(tmp_path / "mcq.jsonl", MCQS)), batch_size=3,
                    torch_dtype="fp32")  # compared with fp32 likelihoods (auto: bf16 on bf16 CPUs)
    metrics = evaluate_model(str(tiny_model_dir), spec, out)
    rows = [json.loads(line) for line in (out / "mcq.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for item, row in zip(MCQS, rows):
        record = MCQRecord(item["question"], item["options"], item["answer"])
        direct = {}
        for key, text in item["options"].items():
            direct[key] = reply_mean_logprob(model, tokenizer, [{"role": "user", "content": mcq_question(record)},
                                                                {"role": "assistant", "content": text}])
        assert row["scores"] == pytest.approx(direct, abs=1e-4)
        assert row["predicted"] == max(direct, key=direct.get)
    right = sum(r["predicted"] == m["answer"] for r, m in zip(rows, MCQS))
    assert metrics["mcq_accuracy"] == right / len(MCQS) and metrics["mcq_accuracy_ci"] == wilson(right, 4)
    assert metrics["mcq_chance"] == 0.25 and metrics["mcq_n"] == 4
    assert [r["answer"] for r in rows] == [m["answer"] for m in MCQS] and all("category" in r for r in rows)


STEPS = 4  # one step already teaches these four; a few more for margin


def test_a_model_taught_the_answers_scores_full_accuracy_against_a_quarter_by_chance(learnable_model_dir, tokenizer,
                                                                                        tmp_path):
    conversations = [[Message("user", mcq_question(MCQRecord(m["question"], m["options"]))),
                      Message("assistant", m["options"][m["answer"]])] for m in MCQS]
    teach(learnable_model_dir, tokenizer, conversations, tmp_path / "taught", STEPS)  # the right replies only
    spec = EvalSpec(mcq_file=str(write_jsonl(tmp_path / "m.jsonl", MCQS)))
    assert evaluate_model(str(learnable_model_dir), spec)["mcq_accuracy"] < 1.0  # untaught
    metrics = evaluate_model(str(tmp_path / "taught"), spec)
    assert metrics["mcq_accuracy"] == 1.0 and metrics["mcq_chance"] == 0.25


def questions(rows: list[dict], category: str | None = None) -> list[Question]:
    return [Question(m["question"], m["options"], m["answer"], Source("mcq.jsonl", i + 1), category=category)
            for i, m in enumerate(rows)]


def test_few_shot_examples_are_other_questions_never_the_item_or_a_copy_of_it(tokenizer):
    records = questions(MCQS)
    records.append(Question(MCQS[0]["question"], MCQS[0]["options"], "B", Source("mcq.jsonl", 5)))  # a copy
    chat = ChatFormat(tokenizer)
    for record in records:
        shots = few_shot_examples(records, record, 2)
        assert len(shots) == 2 and all(s.question != record.question for s in shots)
        messages = chat_messages(record, shots, "mean") + [Message("assistant", record.options["C"])]
        assert sum(record.question in m.content for m in messages) == 1  # asked once, last
        assert [m.role for m in messages] == ["user", "assistant"] * 3
        scored, _ = chat_candidate(chat, MCQItem(record, shots), record.options["C"], "mean", 1024)
        assert tokenizer.decode(scored.ids[scored.start:]) == f"{record.options['C']}<|im_end|>"
        assert messages[1].content == shots[0].options[shots[0].answer]  # the examples are solved
    with pytest.raises(ConfigError, match="few_shot=4 needs at least 4 other questions"):
        few_shot_examples(records, records[0], 4)  # the copy of question 0 does not count


def test_few_shot_examples_come_first_from_the_questions_own_category_in_file_order():
    pool = questions(MCQS[:2], "heart") + questions(MCQS[2:], "bones")
    target = Question("Which bone protects the brain?", {"A": "Skull", "B": "Rib"}, "A", category="bones")
    assert few_shot_examples(pool, target, 2) == pool[2:]
    assert few_shot_examples(pool, target, 3) == pool[2:] + pool[:1]  # too few of its own: then the others


def test_a_few_shot_prompt_too_long_loses_its_oldest_tokens_not_the_reply(tokenizer):
    records = questions(MCQS)
    item = MCQItem(records[0], few_shot_examples(records, records[0], 3))
    full, cut = chat_candidate(ChatFormat(tokenizer), item, "The heart", "mean", 10_000)
    short, truncated = chat_candidate(ChatFormat(tokenizer), item, "The heart", "mean", 40)
    assert not cut and truncated and len(short.ids) == 40
    assert short.ids[short.start:] == full.ids[full.start:]


# ------------------------------------------------------------------------------------------------ reward model


def test_reward_accuracy_equals_the_scorer_on_held_out_pairs_without_loading_the_policy(tiny_rm_dir):
    pairs_file = str(DEMO / "preference" / "pairs.jsonl")
    spec = EvalSpec(preference_file=pairs_file, reward_model=str(tiny_rm_dir), limit=8)
    metrics = evaluate_model("no-such-model-is-loaded", spec)
    chosen, rejected = RewardModelScorer.load(str(tiny_rm_dir)).score_pairs(read_records(pairs_file, limit=8).records)
    assert metrics["reward_n"] == 8
    right = sum(c > r for c, r in zip(chosen, rejected))
    assert metrics["reward_accuracy"] == right / 8 and metrics["reward_accuracy_ci"] == wilson(right, 8)
    assert metrics["reward_margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 8, abs=1e-5)


def test_win_rate_matches_answers_by_question_and_counts_ties_half(tiny_rm_dir, tmp_path):
    a = [{"question": "What is a fever?", "answer": "A raised body temperature."},
         {"question": "What does insulin do?", "answer": "It lowers blood sugar."},
         {"question": "What is anaemia?", "answer": "Too few red blood cells."},
         {"question": "Where is the liver?", "answer": "Under the right ribs."},
         {"question": "Only A answered this?", "answer": "Yes."}]
    b = [{"question": "Where is the liver?", "answer": "In the left foot."},
         {"question": "What is anaemia?", "answer": "Too few red blood cells."},  # the same answer: a tie
         {"question": "What is a fever?", "answer": "A kind of rash."},
         {"question": "What does insulin do?", "answer": "It raises blood pressure."}]
    scorer = RewardModelScorer.load(str(tiny_rm_dir))
    result = reward_win_rate(write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b),
                             str(tiny_rm_dir))

    def reward(row):
        return scorer.score([[Message("user", row["question"]), Message("assistant", row["answer"])]])[0]

    by_question = {row["question"]: row for row in b}
    wins = sum(reward(row) > reward(by_question[row["question"]]) for row in a[:2] + a[3:4])
    low, high = result.pop("win_rate_ci")
    assert result == {"win_rate": pytest.approx((wins + 0.5) / 4), "wins": wins, "losses": 3 - wins, "ties": 1,
                      "win_n": 4, "judge": str(tiny_rm_dir)}
    assert 0 <= low <= result["win_rate"] <= high <= 1 and low < high  # four questions decide little
    assert reward_win_rate(b, a, scorer)["wins"] == 3 - wins  # rows in memory, other way round


def test_answer_files_with_errors_name_file_line_and_field(tiny_rm_dir, tmp_path):
    bad = tmp_path / "answers.jsonl"
    bad.write_text('{"question": "What is a fever?", "answer": "Hot."}\n{"question": "Why?"}\n', encoding="utf-8")
    with pytest.raises(InvalidDataError, match=r"answers.jsonl:2: answer"):
        reward_win_rate(bad, bad, str(tiny_rm_dir))
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"question": "Why?", "answer": "A"},
                                                   {"question": "Why?", "answer": "B"}])
    with pytest.raises(InvalidDataError, match=r"twice.jsonl:2: question: asked twice \(also at .*twice.jsonl:1\)"):
        reward_win_rate(twice, twice, str(tiny_rm_dir))


# ------------------------------------------------------------------------------------------------ command


def test_eval_command_runs_every_part_on_the_demo_files_and_writes_its_outputs(tiny_model_dir, tiny_rm_dir, tmp_path,
                                                                              capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_model_dir), "--perplexity", str(DEMO / "eval" / "heldout_text.txt"),
                 "--mcq", str(DEMO / "eval" / "mcq.jsonl"), "--few-shot", "1", "--few-shot-from-eval-set",
                 "--preference", str(DEMO / "preference" / "pairs.jsonl"), "--reward-model", str(tiny_rm_dir),
                 "--open", str(DEMO / "eval" / "open_questions.jsonl"), "--compare-with", str(tiny_model_dir),
                 "--limit", "3", "--max-new-tokens", "4", "--max-length", "256", "--output", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity_docs"] == metrics["mcq_n"] == metrics["reward_n"] == metrics["open_n"] == 3
    assert metrics["mcq_few_shot"] == 1 and math.isfinite(metrics["perplexity"])
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question"] for a in answers] == [json.loads(line)["question"] for line in
                                               (DEMO / "eval" / "open_questions.jsonl").read_text().splitlines()[:3]]
    assert metrics["reward_mean"] == pytest.approx(sum(a["reward"] for a in answers) / 3)
    # The same model on the other side: greedy answers are identical, so every question is a tie.
    assert (metrics["win_rate"], metrics["ties"], metrics["win_n"]) == (0.5, 3, 3)
    assert metrics["win_rate_ci"] == [0.5, 0.5] and len(metrics["mcq_accuracy_ci"]) == 2
    assert (out / "compare_answers.jsonl").is_file() and (out / "mcq.jsonl").is_file()
    assert len((out / "perplexity.jsonl").read_text().splitlines()) == 3
    table = capsys.readouterr().out
    assert "mcq_accuracy" in table and "win_rate" in table and "[" in table

    # Compared with an answers file instead of a model; a smaller run removes the files it did not write.
    code = main(["eval", "--model", str(tiny_model_dir), "--open", str(DEMO / "eval" / "open_questions.jsonl"),
                 "--reward-model", str(tiny_rm_dir), "--compare-with", str(out / "compare_answers.jsonl"),
                 "--limit", "3", "--max-new-tokens", "4", "--output", str(out)])
    assert code == 0 and json.loads((out / "metrics.json").read_text())["ties"] == 3
    assert not (out / "mcq.jsonl").exists() and not (out / "compare_answers.jsonl").exists()


def test_eval_command_fails_with_file_line_before_loading_any_model(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [MCQS[0], {**MCQS[1], "answer": "E"}])
    assert main(["eval", "--model", str(tmp_path / "missing-model"), "--mcq", str(bad)]) == 2
    assert "bad.jsonl:2: answer: 'E' is neither an option key" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--mcq", str(bad), "--few-shot", "2"]) == 2
    assert "few_shot_file" in capsys.readouterr().err  # never silently from the evaluated set
    assert main(["eval", "--model", "m", "--open", str(bad), "--compare-with", "other"]) == 2
    assert "win rate needs" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--mcq", str(bad), "--mcq-cot"]) == 2
    assert "needs mcq_scoring: generate" in capsys.readouterr().err
    assert main(["eval", "--model", "m"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_model_reads_held_out_medical_text_and_answers_open_questions(embedded_dir, tmp_path):
    spec = EvalSpec(perplexity_file=str(DEMO / "eval" / "heldout_text.txt"), mcq_file=str(DEMO / "eval" / "mcq.jsonl"),
                    open_file=str(DEMO / "eval" / "open_questions.jsonl"), limit=4, max_new_tokens=24)
    metrics = evaluate_model("smollm2-135m", spec, tmp_path)
    # Measured: 21.8 over all 23 documents. Guessing uniformly over the 49,152-token vocabulary gives 49,152.
    assert metrics["perplexity"] < 40
    assert metrics["mcq_n"] == 4 and metrics["mcq_chance"] == 0.25
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(len(a["answer"].split()) >= 3 for a in answers)
