"""Reward modelling on tiny random Llamas: the reward is read at the last real token, the pairwise loss is the
one documented, a learnable preference is learnt, long pairs are cut not dropped, and what a run leaves on
disk resumes, merges and scores the same way through `RewardModelScorer` and `medgpt score`."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from conftest import DEMO, ROOT
from resume_parity import assert_resume_parity
from medgpt.arguments import ModelArguments
from medgpt.config import build_config, check_names, read_yaml
from medgpt.data.records import Message, PreferencePair, Source
from medgpt.models.reward import RewardModelScorer, use_last_token_reward
from medgpt.report import read_metrics
from medgpt.stages import get_stage
from medgpt.stages.rm import pairwise_reward_loss

# ------------------------------------------------------------------------------------------------ helpers

QUESTIONS = [
    "What is a fever?", "Name the largest bone.", "What does insulin do?", "Is aspirin a painkiller?",
    "What is anaemia?", "Where is the liver?", "What causes asthma?", "How many chambers has the heart?",
    "What is a migraine?", "What do kidneys do?", "What is hypertension?", "What is a vaccine?",
]
ANSWERS = [
    "A raised body temperature.", "The femur.", "It lowers blood sugar.", "Yes, a mild one.",
    "Too few red blood cells.", "Under the right ribs.", "Inflamed airways.", "Four chambers.",
    "A severe recurring headache.", "They filter the blood.", "High blood pressure.", "A trained immune defence.",
]

HELD_OUT = [
    ("What is a stroke?", "Blood flow to the brain stops.", "A swimming style."),
    ("What is insulin made by?", "The pancreas.", "The stomach lining."),
    ("What is a bruise?", "Bleeding under the skin.", "A kind of rash."),
    ("How long is a normal pregnancy?", "About forty weeks.", "Six months."),
    ("What is the appendix?", "A small pouch of the gut.", "A bone in the arm."),
    ("What does the spleen do?", "It filters old blood cells.", "It makes bile."),
    ("What is glaucoma?", "Raised pressure in the eye.", "A skin disease."),
    ("What is tinnitus?", "Ringing in the ears.", "A lung infection."),
]


def preference_line(question: str, chosen: str, rejected: str) -> str:
    return json.dumps({"conversations": [{"from": "human", "value": question}], "chosen": chosen, "rejected": rejected})


def write_pairs(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def learnable_pairs(path: Path, copies: int = 1) -> Path:
    """Chosen replies end with the word `indeed`; rejected replies are the same answer without it."""
    lines = [preference_line(q, f"{ANSWERS[(i + k) % len(ANSWERS)]} indeed", ANSWERS[(i + k) % len(ANSWERS)])
             for k in range(copies) for i, q in enumerate(QUESTIONS)]  # copy k pairs question i with answer i + k
    return write_pairs(path, lines)


def run_rm(options: dict, torch_seed: int | None = 0) -> dict:
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    spec = get_stage("rm")
    return spec.run(build_config(spec, dict(options)))


def results(output: Path) -> dict:
    return json.loads((output / "train_results.json").read_text(encoding="utf-8"))


def pair(question: str, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair([Message("user", question)], [Message("assistant", chosen)],
                          [Message("assistant", rejected)], Source("test", 1))


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def rm_options(tmp_path, tiny_model_dir) -> dict:
    return {
        "model_name_or_path": str(tiny_model_dir),
        "train_file_dir": str(learnable_pairs(tmp_path / "data" / "pairs.jsonl")),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_steps": 100,
        "max_length": 128,
        "lora_dropout": 0.0,
        "report_to": "none",
    }


def reward_model(model_dir: Path, tokenizer):
    from medgpt.models.load import load_model

    torch.manual_seed(0)
    return load_model(ModelArguments(model_name_or_path=str(model_dir)), tokenizer, head="sequence_classification")


# ------------------------------------------------------------------------------------------------ pooling


def test_reward_is_read_at_the_last_real_token_when_the_pad_token_is_the_end_of_turn_token(tiny_model_dir, tokenizer):
    from medgpt.data.templates import ChatFormat

    assert tokenizer.pad_token == "<|im_end|>"  # the embedded tokenizer's pad is its end-of-turn token
    chat = ChatFormat(tokenizer)
    long = RewardModelScorer(reward_model(tiny_model_dir, tokenizer), tokenizer, chat).encode(
        [Message("user", "What is a fever?"), Message("assistant", "A body temperature above 38 degrees.")])
    short = long[:-6] + [tokenizer.pad_token_id]  # another sequence that also ends with <|im_end|>
    assert long[-1] == short[-1] == tokenizer.pad_token_id

    hf = reward_model(tiny_model_dir, tokenizer).eval()  # transformers' own pooling, for contrast
    model = reward_model(tiny_model_dir, tokenizer).eval()
    use_last_token_reward(model)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([long, short + [pad] * (len(long) - len(short))])
    mask = torch.tensor([[1] * len(long), [1] * len(short) + [0] * (len(long) - len(short))])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in (long, short)])
        hidden = model.model(input_ids=torch.tensor([short])).last_hidden_state
        at_end_of_turn = model.score(hidden[0, -1])[0]
        hf_padded = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(padded, alone, atol=1e-5)
    assert torch.allclose(alone[1], at_end_of_turn, atol=1e-5)  # the end-of-turn token itself is read
    assert not torch.allclose(hf_padded[1], padded[1], atol=1e-3)  # HF pools before the <|im_end|>


def test_pairwise_loss_with_margin_and_centring_equals_a_hand_computation():
    chosen, rejected = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3])

    def hand(margin, coefficient):
        total = 0.0
        for c, r in zip(chosen.tolist(), rejected.tolist()):
            total += -math.log(1 / (1 + math.exp(-(c - r - margin))))
        centring = sum((c + r) ** 2 for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
        return total / 3 + coefficient * centring

    plain = pairwise_reward_loss(chosen, rejected)
    assert plain.item() == pytest.approx(hand(0.0, 0.0), rel=1e-6)
    assert plain.item() == pytest.approx(-F.logsigmoid(chosen - rejected).mean().item(), rel=1e-6)
    with_margin = pairwise_reward_loss(chosen, rejected, margin=0.5)
    assert with_margin.item() == pytest.approx(hand(0.5, 0.0), rel=1e-6)
    assert with_margin > plain  # a required gap makes every pair look worse
    centred = pairwise_reward_loss(chosen, rejected, margin=0.5, center_coefficient=0.01)
    assert centred.item() == pytest.approx(hand(0.5, 0.01), rel=1e-6)
    assert centred.item() - with_margin.item() == pytest.approx(0.01 * ((chosen + rejected) ** 2).mean().item())


def test_packed_pairs_give_the_padded_rewards_loss_and_gradients(rm_options):
    from medgpt.data.collators import RewardPairCollator
    from medgpt.models.reward import right_padded

    spec = get_stage("rm")
    config = build_config(spec, {**rm_options, "bf16": False})
    from medgpt.data.templates import ChatFormat
    from medgpt.models.load import load_tokenizer
    from medgpt.stages.rm import RewardTrainer, prepare_reward_model, reward_features

    tokenizer = load_tokenizer(config.model)
    records = [pair(q, f"{a} indeed", a) for q, a in zip(QUESTIONS[:3], ANSWERS)]
    features, _ = reward_features(ChatFormat(tokenizer), records, 128)
    model = prepare_reward_model(config, tokenizer, 128)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a trained-looking adapter: rewards that differ per pair
            if "lora_B" in name:
                param.normal_(0, 0.5)
    from medgpt.training.recipe import use_packed_attention

    use_packed_attention(model)
    trainer = RewardTrainer(model=model, args=config.training, processing_class=tokenizer,
                            data_collator=RewardPairCollator(tokenizer.pad_token_id))

    def loss_and_grads(compute):
        model.zero_grad()
        chosen, rejected = compute()
        loss = pairwise_reward_loss(chosen, rejected, 0.5, 0.01)
        loss.backward()
        return torch.cat([chosen, rejected]).detach(), loss.item(), [p.grad.clone() for p in model.parameters()
                                                                     if p.requires_grad]

    def previous():  # the padded path this stage ran before packing: one right-padded row per sequence
        ids, mask = right_padded([f["input_ids_chosen"] for f in features]
                                 + [f["input_ids_rejected"] for f in features], tokenizer.pad_token_id)
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float().chunk(2)

    packed = RewardPairCollator(tokenizer.pad_token_id)(features)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    ours = loss_and_grads(lambda: trainer.rewards(model, packed))
    theirs = loss_and_grads(previous)
    padded = loss_and_grads(lambda: trainer.rewards(model, RewardPairCollator(tokenizer.pad_token_id, False)(features)))
    assert len(set(round(x, 3) for x in theirs[0].tolist())) > 3  # distinct rewards were compared
    for other in (ours, padded):
        assert torch.allclose(other[0], theirs[0], atol=1e-5)
        assert other[1] == pytest.approx(theirs[1], rel=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(other[2], theirs[2]))


# ------------------------------------------------------------------------------------------------ learning


def test_rm_accuracy_rises_above_90_percent_when_chosen_is_learnable(rm_options, learnable_model_dir, tmp_path):
    held_out = write_pairs(tmp_path / "data" / "held_out.jsonl", [  # questions and answers never trained on
        preference_line(q, f"{a} indeed", a) for q, a, _ in HELD_OUT])
    data = learnable_pairs(tmp_path / "data" / "learnable.jsonl", copies=4)  # 48 pairs
    metrics = run_rm({**rm_options, "model_name_or_path": str(learnable_model_dir), "max_steps": 20,
                      "train_file_dir": str(data),
                      "per_device_train_batch_size": 4, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
                      "validation_file_dir": str(held_out), "per_device_eval_batch_size": 16,
                      "bf16": False})  # 8 held-out pairs: bf16 noise on this tiny model moves one or two
    assert metrics["eval_accuracy"] > 0.9, metrics
    assert metrics["eval_margin"] > 0 and metrics["eval_reward_chosen"] > metrics["eval_reward_rejected"]
    train_rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert sum(r["loss"] for r in train_rows[-5:]) < sum(r["loss"] for r in train_rows[:5])


def test_long_pairs_are_truncated_from_the_left_not_dropped_and_counted(rm_options, tmp_path):
    long_prompt = " ".join(["please explain the kidney"] * 40)
    long_reply = " ".join(["the heart pumps blood"] * 40)
    data = write_pairs(tmp_path / "data" / "long.jsonl", [
        preference_line("What is a fever?", "A raised temperature.", "A rash."),  # kept whole
        preference_line(long_prompt, "Kidneys filter blood.", "No idea."),  # prompt cut from the left
        preference_line("Describe the heart.", long_reply, "A bone."),  # reply cut at its end
    ])
    metrics = run_rm({**rm_options, "train_file_dir": str(data), "max_length": 64})
    saved = results(tmp_path / "out")
    counts = [saved[f"rm_{k}"] for k in ("kept", "prompt_truncated", "reply_truncated", "dropped")]
    assert counts == [1, 1, 1, 0]
    assert metrics["rm_prompt_truncated"] == 1

    from medgpt.data.templates import ChatFormat
    from medgpt.models.load import load_tokenizer
    from medgpt.stages.rm import reward_features

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=rm_options["model_name_or_path"]))
    chat = ChatFormat(tokenizer)
    record = pair(long_prompt, "Kidneys filter blood.", "No idea.")
    features, _ = reward_features(chat, [record], 64)
    full = chat.encode(record.prompt + record.chosen).input_ids
    chosen = features[0]["input_ids_chosen"]
    assert len(chosen) <= 64 and len(features[0]["input_ids_rejected"]) <= 64
    assert chosen[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the reply and its end-of-turn survive
    assert full[: chat.encode(record.prompt + record.chosen).turn_ends[-1]][-len(chosen):] == chosen  # the start went


# ------------------------------------------------------------------------------------------------ outputs


def test_rm_lora_run_saves_adapter_with_score_head_reward_plot_and_eval_metrics(rm_options, tmp_path):
    out = tmp_path / "out"
    metrics = run_rm({**rm_options, "max_steps": 3, "validation_split_percentage": 25, "eval_strategy": "steps",
                      "eval_steps": 2})
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "run_config.yaml", "metrics.jsonl", "loss.png", "reward.png", "README.md", "train_results.json"):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    head = [k for k in adapter if "lora_" not in k]
    assert head == ["base_model.model.score.weight"] and adapter[head[0]].shape == (1, 32)
    assert (out / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "eval_accuracy" in r]
    assert evals and all(0 <= r["eval_accuracy"] <= 1 and "eval_margin" in r for r in evals)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all("accuracy" in r and "margin" in r for r in rows if "loss" in r)
    saved = results(out)
    assert saved["eval_accuracy"] == metrics["eval_accuracy"]
    assert saved["rm_kept"] == 9 and saved["global_step"] == 3
    assert yaml.safe_load((out / "run_config.yaml").read_text())["stage"] == "rm"
    assert "rm" in (out / "README.md").read_text()


def test_full_rm_training_saves_a_sequence_classification_model_the_scorer_loads(rm_options, tmp_path):
    out = tmp_path / "out"
    run_rm({**rm_options, "use_peft": False, "learning_rate": 1e-3})
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] is not None
    scorer = RewardModelScorer.load(str(out))
    chosen, rejected = scorer.score_pairs([pair("What is a fever?", "A raised temperature indeed", "A rash.")])
    assert math.isfinite(chosen[0]) and math.isfinite(rejected[0])


def test_merged_rm_keeps_the_head_and_scores_like_the_adapter(rm_options, tmp_path):
    from medgpt.models.merge import merge_adapter

    out = tmp_path / "out"
    run_rm({**rm_options, "max_steps": 3, "learning_rate": 1e-2})
    merged = merge_adapter(out, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    trained_head = load_file(str(out / "adapter_model.safetensors"))["base_model.model.score.weight"]
    assert torch.equal(load_file(str(merged / "model.safetensors"))["score.weight"], trained_head)

    pairs = [pair(q, f"{a} indeed", ANSWERS[(i + 3) % len(ANSWERS)])
             for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    conversations = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    # fp32: merged and unmerged weights round differently in bf16 (the inference default on bf16 CPUs)
    by_adapter = RewardModelScorer.load(str(out), batch_size=5, torch_dtype="fp32").score(conversations)
    by_merged = RewardModelScorer.load(str(merged), batch_size=3, torch_dtype="fp32").score(conversations)
    assert len(set(round(x, 4) for x in by_adapter)) > 1  # real, distinct scores
    assert by_merged == pytest.approx(by_adapter, abs=1e-4)
    one_by_one = RewardModelScorer.load(str(merged), batch_size=1, torch_dtype="fp32")
    assert one_by_one.score(conversations[:4]) == pytest.approx(by_merged[:4], abs=1e-5)  # padding changes nothing
    chosen, rejected = one_by_one.score_pairs(pairs[:2])
    assert chosen == pytest.approx(by_merged[:2], abs=1e-5)
    assert rejected == pytest.approx(by_merged[len(pairs):len(pairs) + 2], abs=1e-5)


def test_scorer_refuses_a_model_without_a_reward_head(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="without a reward head"):
        RewardModelScorer.load(str(tiny_model_dir))
    with pytest.raises(FileNotFoundError):
        RewardModelScorer.load(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ resume


def test_resumed_rm_run_equals_the_uninterrupted_run(rm_options, tmp_path):
    adapter = assert_resume_parity("rm", {**rm_options, "learning_rate": 1e-3, "seed": 7}, tmp_path, steps=6, every=3)
    assert "base_model.model.score.weight" in adapter  # the score head is saved and resumed with the adapter


def test_reward_models_on_two_train_shards_tokenise_and_train_on_disjoint_halves(rm_options, tmp_path):
    # The shard is part of the tokenised-feature cache key: the second half must not reuse the first's features.
    runs = {shard: run_rm({**rm_options, "train_shard": shard, "output_dir": str(tmp_path / str(shard).replace("/", "of"))})
            for shard in ("1/2", "2/2", None)}
    halves = [runs[s]["rm_kept"] for s in ("1/2", "2/2")]
    assert all(halves) and sum(halves) == runs[None]["rm_kept"]
    assert runs["1/2"]["rm_tokens"] + runs["2/2"]["rm_tokens"] == runs[None]["rm_tokens"]
    assert runs["1/2"]["rm_tokens"] != runs["2/2"]["rm_tokens"]


def test_rm_resumed_from_its_last_checkpoint_trains_nothing_and_saves_that_checkpoint(rm_options, tmp_path):
    out, options = tmp_path / "out", {**rm_options, "max_steps": 2, "save_steps": 2}  # checkpoint-2 is mid-epoch
    run_rm(options)
    for path in list(out.iterdir()):  # killed after checkpoint-2 (= max_steps), before the final save
        if not path.name.startswith("checkpoint-"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    metrics = run_rm({**options, "resume_from_checkpoint": "auto"})
    assert metrics["global_step"] == results(out)["global_step"] == 2 and not (out / "checkpoint-3").exists()
    final = load_file(str(out / "adapter_model.safetensors"))
    checkpoint = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)


# ------------------------------------------------------------------------------------------------ medgpt score


@pytest.fixture
def trained_rm(rm_options, tmp_path) -> Path:
    run_rm({**rm_options, "max_steps": 2})
    return tmp_path / "out"


def test_score_command_prints_pair_rewards_and_accuracy_and_writes_jsonl(trained_rm, rm_options, tmp_path, capsys):
    from medgpt.cli import main

    rows_file = tmp_path / "scores.jsonl"
    code = main(["score", "--reward-model", str(trained_rm), "--data", rm_options["train_file_dir"],
                 "--batch-size", "4", "--output", str(rows_file)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "accuracy" in printed and "12 pairs" in printed
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert len(rows) == 12 and all({"source", "chosen", "rejected", "chosen_wins"} <= set(r) for r in rows)
    wins = sum(r["chosen_wins"] for r in rows)
    assert f"{wins}/12" in printed
    expected = RewardModelScorer.load(str(trained_rm)).score_pairs(
        [pair(QUESTIONS[0], f"{ANSWERS[0]} indeed", ANSWERS[0])])
    assert rows[0]["chosen"] == pytest.approx(expected[0][0], abs=1e-5)
    assert rows[0]["rejected"] == pytest.approx(expected[1][0], abs=1e-5)


def test_score_command_gives_one_reward_per_conversation(trained_rm, tmp_path, capsys):
    from medgpt.cli import main

    data = write_pairs(tmp_path / "chats.jsonl", [json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) for q, a in zip(QUESTIONS[:3], ANSWERS)])
    assert main(["score", "--reward-model", str(trained_rm), "--data", str(data)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "reward" in line]
    assert len(lines) == 3 and "accuracy" not in " ".join(lines)


def test_score_command_fails_with_a_message_on_a_missing_model_or_invalid_data(trained_rm, tmp_path, capsys):
    from medgpt.cli import main

    data = write_pairs(tmp_path / "bad.jsonl", ['{"conversations": [{"from": "robot", "value": "hi"}]}'])
    assert main(["score", "--reward-model", str(trained_rm), "--data", str(data)]) != 0
    assert "bad.jsonl:1" in capsys.readouterr().err
    good = write_pairs(tmp_path / "good.jsonl", [preference_line("Hi?", "Hello indeed", "Go away")])
    assert main(["score", "--reward-model", str(tmp_path / "nowhere"), "--data", str(good)]) != 0
    assert "nowhere" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ configs, scale


@pytest.mark.parametrize("name", ["rm.yaml", "rm_qwen.yaml"])
def test_rm_example_configs_use_known_options(name):
    values = read_yaml(ROOT / "configs" / name)
    assert values["stage"] == "rm"
    check_names(get_stage("rm"), values)
    if "qwen" not in name:
        config = build_config(get_stage("rm"), values)
        assert config.model.model_name_or_path == "smollm2-135m" and (ROOT / config.data.train_file_dir).exists()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_stage(stage: str, options: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`medgpt STAGE` under torchrun with 2 CPU processes (gloo), options as key=value."""
    script = tmp_path / "launch.py"  # the stage may not be in STAGE_MODULES yet: register it, then run the CLI
    script.write_text(f"import sys, medgpt.stages.{stage}\nfrom medgpt.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "MEDGPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(script), stage, *[f"{k}={v}" for k, v in options.items()], *extra]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


def test_torchrun_two_cpu_processes_train_the_rm_and_gather_eval_metrics_over_both(rm_options, tmp_path):
    out = tmp_path / "dp"
    torchrun_stage("rm", {**rm_options, "output_dir": out}, tmp_path,
                   "validation_file_dir=" + rm_options["train_file_dir"], "max_eval_samples=5",
                   "per_device_eval_batch_size=2", "bf16=false")  # fp32: compared exactly with the scorer below
    saved = results(out)
    assert saved["world_size"] == 2 and saved["global_step"] == 2
    # 5 eval pairs over 2 ranks (3 + 3 with one repeated): the metrics cover exactly the 5, from both ranks
    lines = Path(rm_options["train_file_dir"]).read_text().splitlines()[:5]
    pairs = [pair(json.loads(x)["conversations"][0]["value"], json.loads(x)["chosen"], json.loads(x)["rejected"])
             for x in lines]
    chosen, rejected = RewardModelScorer.load(str(out), torch_dtype="fp32").score_pairs(pairs)
    assert saved["eval_reward_chosen"] == pytest.approx(sum(chosen) / 5, abs=1e-5)
    assert saved["eval_reward_rejected"] == pytest.approx(sum(rejected) / 5, abs=1e-5)
    assert saved["eval_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 5)
    assert len([r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]) == 2


@pytest.mark.slow
def test_rm_runs_three_steps_on_the_embedded_model_with_the_demo_preferences(tmp_path):
    metrics = run_rm({"model_name_or_path": "smollm2-135m", "train_file_dir": str(DEMO / "preference"),
                      "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 2,
                      "max_length": 256, "validation_split_percentage": 5, "max_eval_samples": 2,
                      "per_device_eval_batch_size": 2,
                      "logging_steps": 1, "report_to": "none"})
    assert metrics["global_step"] == 3 and math.isfinite(metrics["train_loss"])
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert (tmp_path / "out" / "reward.png").is_file() and (tmp_path / "out" / "adapter_model.safetensors").is_file()
