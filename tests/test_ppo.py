"""PPO on tiny random Llamas: log-probs independent of padding, the reference is the start policy, a rule
reward is learnt with KL bounded, a resumed run equals the uninterrupted one, rollouts can come from a (fake)
vLLM server, two torchrun processes train one model; and a slow run on the embedded model against a reward
model trained in the test."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO, ROOT
from medgpt.arguments import AdapterArguments, ModelArguments
from medgpt.config import ConfigError, build_config, read_yaml
from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat
from medgpt.report import read_metrics
from medgpt.rl.actor_critic import ActorCritic
from medgpt.rl.ppo import rollout_batch
from medgpt.stages import get_stage
from test_multiprocess import free_port

pytestmark = pytest.mark.usefixtures("private_cache")

QUESTION = "What is a fever?"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; many threads on a shared CPU mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_rule(path: Path, body: str) -> str:
    """A rule reward with TRL's signature, in its own file, named as `file.py:function` in the config."""
    path.write_text(f"def reward(completion_ids, **columns):\n    return [{body} for ids in completion_ids]\n")
    return f"{path}:reward"


def write_questions(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in questions), encoding="utf-8")
    return path


def run_ppo(options: dict) -> dict:
    spec = get_stage("ppo")
    return spec.run(build_config(spec, dict(options)))


@pytest.fixture
def ppo_options(tmp_path, learnable_model_dir) -> dict:
    """A few PPO steps on a tiny model whose replies vary, rewarded for odd token ids: every number moves."""
    questions = [f"Question number {i}: what is a fever?" for i in range(8)]
    return {
        "model_name_or_path": str(learnable_model_dir),
        "train_file_dir": str(write_questions(tmp_path / "qa.jsonl", questions)),
        "output_dir": str(tmp_path / "out"),
        "reward_funcs": write_rule(tmp_path / "rule.py", "sum(t % 2 for t in ids) / len(ids)"),
        "max_steps": 2, "rollout_batch_size": 4, "per_device_train_batch_size": 2, "max_new_tokens": 4,
        "ppo_epochs": 1, "learning_rate": 1e-3, "lora_dropout": 0.0, "save_strategy": "no",
    }


def build_network(model_dir: Path, tokenizer, reference_adapter: str | None = None) -> ActorCritic:
    from medgpt.models.adapters import attach_adapter
    from medgpt.models.load import load_model

    torch.manual_seed(0)
    args = AdapterArguments(lora_dropout=0.0, peft_path=reference_adapter)
    policy = attach_adapter(load_model(ModelArguments(model_name_or_path=str(model_dir)), tokenizer), args)
    return ActorCritic.build(policy, args, use_peft=True, reference_adapter_path=reference_adapter)


def perturb_actor(network: ActorCritic) -> None:
    with torch.no_grad():
        for name, param in network.named_trainable:
            if ".default." in name:
                param.add_(0.05 * torch.randn_like(param))


# ------------------------------------------------------------------------------------------------ networks


def test_reply_logprobs_and_values_do_not_depend_on_padding(tiny_model_dir, tokenizer):
    network = build_network(tiny_model_dir, tokenizer)
    perturb_actor(network)  # a non-trivial actor, so actor and reference differ
    chat = ChatFormat(tokenizer)
    prompts = [chat.prompt_ids([Message("user", "Hi")]), chat.prompt_ids([Message("user", "What is a fever, doctor?")])]
    replies = [[100, 200, 300, 400, 500], [600, 700]]
    batch, tokens, mask = rollout_batch(prompts, replies, tokenizer.pad_token_id, "cpu")
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    with torch.no_grad():
        logprobs, _ = network.policy_token_stats(batch, tokens, mask, 1.0)
        values = network.values(batch, 5)
        for row, (prompt, reply) in enumerate(zip(prompts, replies)):
            alone, alone_tokens, alone_mask = rollout_batch([prompt], [reply], tokenizer.pad_token_id, "cpu")
            expected = network.policy_token_stats(alone, alone_tokens, alone_mask, 1.0)[0][0]
            assert torch.allclose(logprobs[row, :len(reply)], expected, atol=1e-5)
            assert torch.allclose(values[row, :len(reply)], network.values(alone, len(reply))[0], atol=1e-5)
            # and the same as the plain causal LM on the unpadded sequence (values() left the critic adapter on)
            network.use("default")
            full = torch.tensor([prompt + reply])
            plain = network.policy(input_ids=full).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            assert torch.allclose(expected, plain.gather(-1, torch.tensor(reply)[:, None])[:, 0], atol=1e-5)
        assert logprobs[1, 2:].abs().sum() == 0  # padding has no log-prob


def test_reference_is_the_policy_as_the_stage_starts_and_stays_frozen(tiny_model_dir, tokenizer, tmp_path):
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(6)[None]}
    # a new adapter on a plain (or merged SFT) model: the reference is the model with adapters off
    network = build_network(tiny_model_dir, tokenizer)
    tokens, mask = ids[:, -3:], torch.ones(1, 3)

    def actor():
        return network.policy_token_stats(batch, tokens, mask, 1.0)[0].detach()

    def reference():
        return network.reference_logprobs(batch, tokens, mask, 1.0)

    start = actor()
    assert torch.allclose(reference(), start)
    perturb_actor(network)
    assert not torch.allclose(actor(), start, atol=1e-4)
    assert torch.allclose(reference(), start)

    # an unmerged SFT adapter: the reference is a frozen copy of it, not the pre-SFT base
    sft = build_network(tiny_model_dir, tokenizer)
    perturb_actor(sft)
    sft.policy.save_pretrained(str(tmp_path / "sft"), selected_adapters=["default"])
    sft_logprobs = sft.policy_token_stats(batch, tokens, mask, 1.0)[0].detach()
    network = build_network(tiny_model_dir, tokenizer, reference_adapter=str(tmp_path / "sft"))
    assert torch.allclose(actor(), sft_logprobs, atol=1e-6)
    assert torch.allclose(reference(), sft_logprobs, atol=1e-6)
    perturb_actor(network)
    assert torch.allclose(reference(), sft_logprobs, atol=1e-6)
    assert all(".ref." not in name for name, _ in network.named_trainable)


def test_full_training_keeps_one_frozen_copy_as_reference_and_critic_backbone(ppo_options, learnable_model_dir):
    from transformers import AutoModelForCausalLM

    out = Path(ppo_options["output_dir"])
    run_ppo({**ppo_options, "use_peft": False, "learning_rate": 1e-4})
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    ids = torch.tensor([[5, 6, 7, 8]])
    trained = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert not torch.allclose(trained, AutoModelForCausalLM.from_pretrained(learnable_model_dir)(ids).logits, atol=1e-4)
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-5) and rows[1]["kl"] != 0  # the copy stayed where it started


# ------------------------------------------------------------------------------------------------ learning


@pytest.fixture
def sharp_model_dir(learnable_model_dir, tokenizer, tmp_path) -> Path:
    """The learnable tiny Llama with its final norm doubled: next-token distributions peaked enough (entropy
    ~2.4 nats) that a given token comes up now and then, so a reward for it has something to reinforce."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(learnable_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    model.save_pretrained(tmp_path / "sharp")
    tokenizer.save_pretrained(tmp_path / "sharp")
    return tmp_path / "sharp"


def test_ppo_learns_a_rule_reward_while_kl_stays_bounded(sharp_model_dir, tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    prompt = ChatFormat(tokenizer).prompt_ids([Message("user", QUESTION)])
    with torch.no_grad():
        first = LlamaForCausalLM.from_pretrained(sharp_model_dir)(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    target = first.topk(2).indices[1].item()  # the runner-up first token: sampled now and then (p ~ 0.1)
    assert 0.02 < first[target] < 0.3
    out = tmp_path / "out"
    started = time.perf_counter()
    metrics = run_ppo({
        "model_name_or_path": str(sharp_model_dir), "output_dir": str(out),
        "train_file_dir": str(write_questions(tmp_path / "qa.jsonl", [QUESTION] * 16)),
        "reward_funcs": write_rule(tmp_path / "rule.py", f"float({target} in ids)"),
        "max_steps": 16, "rollout_batch_size": 16, "per_device_train_batch_size": 8, "ppo_epochs": 2,
        "max_new_tokens": 6, "learning_rate": 5e-4, "kl_coef": 0.02, "lora_dropout": 0.0, "save_strategy": "no",
    })
    elapsed = time.perf_counter() - started
    rows = read_metrics(out / "metrics.jsonl")
    rewards, kls = [r["reward"] for r in rows], [r["kl"] for r in rows]
    assert len(rows) == 16 and metrics["global_step"] == 16
    assert sum(rewards[:3]) / 3 < 0.4, rewards
    assert sum(rewards[-4:]) / 4 > 0.8, rewards
    assert kls[0] == pytest.approx(0, abs=1e-5)  # the first rollouts come from the reference itself
    assert max(kls) < 8, kls  # nats per 6-token reply: the leash holds
    for key in ("entropy", "clipfrac", "approx_kl", "policy_loss", "value_loss", "response_length", "kl_coef"):
        assert all(math.isfinite(r[key]) for r in rows), key
    phases = [[row[f"time_{phase}"] for phase in ("generate", "score", "forward", "update")] for row in rows]
    assert all(t > 0 for step in phases for t in step)  # where each step's time went: every phase ran ...
    assert sum(map(sum, phases)) < elapsed  # ... and the phases fit inside the run
    for name in ("adapter_model.safetensors", "ppo.png", "ppo_losses.png", "rollouts.jsonl", "samples.jsonl",
                 "run_config.yaml", "train_results.json", "README.md"):
        assert (out / name).is_file(), name
    assert not list(out.glob("critic*")) and "critic" not in (out / "adapter_config.json").read_text()
    samples = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(samples) == 16 * 2 and samples[0]["prompt"] == QUESTION and "response" in samples[0]


# ------------------------------------------------------------------------------------------------ resume


def test_resumed_ppo_run_equals_the_uninterrupted_run_and_merges(ppo_options, tmp_path, learnable_model_dir):
    options = {**ppo_options, "max_steps": 4, "save_strategy": "steps", "save_steps": 2,
               "reward_normalization": "running", "target_kl": 0.01, "kl_horizon": 100}
    whole = run_ppo(options)
    out = Path(options["output_dir"])
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    state = json.loads((out / "checkpoint-2" / "ppo_state.json").read_text())
    assert state["step"] == 2 and state["score_moments"]["count"] > 7 and state["kl_controller"]["value"] != 0.05

    cut = tmp_path / "cut"  # a run killed after its step-2 checkpoint, its log running one step further
    cut.mkdir()
    shutil.copytree(out / "checkpoint-2", cut / "checkpoint-2")
    rows = read_metrics(out / "metrics.jsonl")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    resumed = run_ppo({**options, "output_dir": str(cut), "resume_from_checkpoint": "auto"})

    assert resumed["global_step"] == whole["global_step"] == 4
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(cut / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    again = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert len({r["reward"] for r in rows}) > 1 and all(r["kl"] != 0 for r in rows[1:])  # nothing trivial
    for old, new in zip(rows[2:], again[2:]):
        assert new["reward"] == old["reward"] and new["kl"] == pytest.approx(old["kl"], abs=1e-6)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medgpt.models.merge import merge_adapter

    merge_adapter(out, tmp_path / "merged")
    ids = torch.tensor([[5, 6, 7, 8]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir)
    start = base(ids).logits
    adapter = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert torch.allclose(merged, adapter, atol=1e-4) and not torch.allclose(adapter, start, atol=1e-3)


# ------------------------------------------------------------------------------------------------ vLLM


class FakeVLLM(BaseHTTPRequestHandler):
    """The four endpoints PPO uses, answering like vLLM: even prompts get a finished reply, odd ones run to
    max_tokens without an end-of-turn token."""

    requests: list = []
    reply_ids = [9906, 1130]

    def do_GET(self):
        self.answer({"data": [{"id": "tiny-base"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeVLLM.requests.append((self.path, body))
        if self.path == "/v1/load_lora_adapter":
            ok = (Path(body["lora_path"]) / "adapter_model.safetensors").is_file()
            return self.answer("Success" if ok else "no adapter there", 200 if ok else 400)
        if self.path == "/v1/unload_lora_adapter":
            return self.answer("Success")
        choices = []
        for index, _ in enumerate(body["prompt"]):
            finished = index % 2 == 0
            ids = self.reply_ids + [body["stop_token_ids"][0]] if finished else self.reply_ids * body["max_tokens"]
            choices.append({"index": index, "text": "", "token_ids": ids[: body["max_tokens"]],
                            "finish_reason": "stop" if finished else "length"})
        self.answer({"choices": choices[::-1]})  # any order: the client sorts by index

    def answer(self, payload, status: int = 200):
        data = (json.dumps(payload) if not isinstance(payload, str) else payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        return None


@pytest.fixture
def fake_vllm():
    FakeVLLM.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_vllm_backend_syncs_the_adapter_each_step_and_trains_on_the_returned_token_ids(ppo_options, fake_vllm,
                                                                                     tokenizer):
    out = Path(ppo_options["output_dir"])
    run_ppo({**ppo_options, "generation_backend": "vllm", "vllm_server_url": fake_vllm, "missing_eos_penalty": 1.0})
    calls = [(path, body) for path, body in FakeVLLM.requests]
    assert [path for path, _ in calls] == ["/v1/load_lora_adapter", "/v1/completions",
                                           "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/completions"]
    assert [calls[i][1]["lora_name"] for i in (0, 2, 3)] == ["policy-step-0", "policy-step-1", "policy-step-0"]
    assert not (out / "vllm" / "policy-step-0").exists() and (out / "vllm" / "policy-step-1").is_dir()
    chat = ChatFormat(tokenizer)
    for (_, request), model in zip((calls[1], calls[4]), ("policy-step-0", "policy-step-1")):
        assert request["model"] == model and request["return_token_ids"] is True
        assert request["max_tokens"] == 4 and request["stop_token_ids"] == chat.stop_token_ids()
        assert len(request["prompt"]) == 4
        assert all(tokenizer.decode(p).startswith("<|im_start|>") and "Question number" in tokenizer.decode(p)
                   for p in request["prompt"])
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["no_eos_fraction"] for r in rows] == [0.5, 0.5]
    assert all(r["score"] == pytest.approx(r["reward"] - 0.5) for r in rows)  # penalty 1 on half the replies
    replies = {json.loads(line)["response"] for line in (out / "rollouts.jsonl").read_text().splitlines()}
    assert tokenizer.decode(FakeVLLM.reply_ids).strip() in replies


def test_vllm_client_says_how_to_start_the_server_when_none_answers(tmp_path):
    from medgpt.serve.vllm_client import VLLMError, VLLMRollouts

    with pytest.raises(VLLMError, match="cannot reach the vLLM server.*--enable-lora"):
        VLLMRollouts(f"http://127.0.0.1:{free_port()}", [2], tmp_path)


# ------------------------------------------------------------------------------------------------ options


def test_ppo_help_lists_its_options_and_unused_trainer_options_are_refused(ppo_options, capsys):
    from medgpt.cli import main

    assert main(["ppo", "--help"]) == 0
    manual = capsys.readouterr().out
    for name in ("reward_model_name_or_path", "max_new_tokens", "ppo_epochs", "kl_coef", "target_kl", "gamma",
                 "lam", "cliprange", "cliprange_value", "vf_coef", "entropy_coef", "missing_eos_penalty"):
        assert f"  {name} (default" in manual, name
    with pytest.raises(ConfigError, match="does not use eval_strategy"):
        run_ppo({**ppo_options, "eval_strategy": "steps"})
    with pytest.raises(ConfigError, match="needs a reward"):
        run_ppo({k: v for k, v in ppo_options.items() if k != "reward_funcs"})
    with pytest.raises(ConfigError, match="multiple of per_device_train_batch_size"):
        run_ppo({**ppo_options, "rollout_batch_size": 3})


@pytest.mark.parametrize("name", ["ppo.yaml", "ppo_qwen.yaml"])
def test_ppo_example_configs_give_only_trainer_options_ppo_reads(name):
    from transformers import TrainingArguments

    from medgpt.config import OWN_SECTIONS
    from medgpt.rl.ppo_config import TRAINING_OPTIONS, PPOArguments

    values = read_yaml(ROOT / "configs" / name)
    own = {f.name for cls in (*OWN_SECTIONS, PPOArguments) for f in dataclasses.fields(cls)}
    upstream = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert not {k for k in values if k in upstream and k not in own} - set(TRAINING_OPTIONS)
    if "qwen" not in name:
        from medgpt.rl.recipe import check_options

        assert check_options(build_config(get_stage("ppo"), values)) == ["reward_model"]


# ------------------------------------------------------------------------------------------------ scale


def test_torchrun_two_cpu_processes_train_one_ppo_policy(ppo_options, tmp_path):
    out = tmp_path / "dp"
    env = {**os.environ, "MEDGPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    options = {**ppo_options, "output_dir": str(out), "rollout_batch_size": 2}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "medgpt.cli", "ppo", *[f"{k}={v}" for k, v in options.items()]]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] == 2  # and the ranks' weights agreed at the end
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]  # rank 0 alone logs
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 2 * 2
    assert len(list(out.glob("adapter_model.safetensors"))) == 1


def _launch(processes: int, options: dict, tmp_path: Path, extra_env: dict | None = None) -> Path:
    env = {**os.environ, "MEDGPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT / "tests"),
                                                       os.environ.get("PYTHONPATH")])), **(extra_env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = str(ROOT / "tests" / "rl_sharded_run.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, script, json.dumps(options)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return Path(options["output_dir"])


def test_fsdp2_and_data_parallel_full_training_match_one_process_with_the_same_global_batch(ppo_options, tmp_path):
    """4 prompts per step: one process with rollout_batch_size 4, or two with 2 each, sharded by FSDP2 (actor and
    critic backbone) or replicated (gradients averaged). Replies are a fixed function of the prompt, so all three
    must end with the same weights."""
    base = {**ppo_options, "use_peft": False, "learning_rate": 1e-4, "ppo_epochs": 1, "max_steps": 2,
            "reward_normalization": "batch", "target_kl": 1.0, "kl_horizon": 100, "max_grad_norm": 0.5,
            "bf16": False}  # equal to float rounding: bf16 compute would round differently in each layout
    runs = {"one": _launch(1, {**base, "output_dir": str(tmp_path / "one"), "rollout_batch_size": 4,
                               "per_device_train_batch_size": 4}, tmp_path)}
    sharded = {"fsdp": "full_shard", "fsdp_config": {"version": 2}, "save_strategy": "steps", "save_steps": 1}
    for name, extra in (("fsdp", sharded), ("ddp", {})):
        runs[name] = _launch(2, {**base, **extra, "output_dir": str(tmp_path / name), "rollout_batch_size": 2,
                                 "per_device_train_batch_size": 2}, tmp_path)
    checkpoint = runs["fsdp"] / "checkpoint-1"
    assert {p.name for p in checkpoint.glob("*_rank*")} == {f"{kind}_rank{r}.{ext}" for r in (0, 1) for kind, ext in
                                                            (("trainable", "safetensors"), ("optimizer", "pt"))}
    cut = tmp_path / "resumed"  # a sharded run killed after step 1, resumed: each process loads its own shard
    cut.mkdir()
    shutil.copytree(checkpoint, cut / "checkpoint-1")
    runs["resumed"] = _launch(2, {**base, **sharded, "output_dir": str(cut), "rollout_batch_size": 2,
                                  "per_device_train_batch_size": 2, "resume_from_checkpoint": "auto"}, tmp_path)
    results = {name: json.loads((out / "train_results.json").read_text()) for name, out in runs.items()}
    assert results["fsdp"]["distributed_type"] == "fsdp" and results["fsdp"]["world_size"] == 2
    assert results["ddp"]["distributed_type"] == "ddp" and results["one"]["distributed_type"] == "single"
    weights = {name: load_file(str(out / "model.safetensors")) for name, out in runs.items()}
    start = load_file(str(Path(ppo_options["model_name_or_path"]) / "model.safetensors"))
    moved = max((weights["one"][k] - start[k]).abs().max().item() for k in start if k in weights["one"])
    assert moved > 1e-5
    assert all(torch.allclose(weights["resumed"][k], weights["fsdp"][k], atol=1e-7) for k in weights["fsdp"])
    for name in ("fsdp", "ddp"):
        assert weights[name].keys() == weights["one"].keys()
        worst = max((weights[name][k] - weights["one"][k]).abs().max().item() for k in weights["one"])
        assert worst < 1e-2 * moved, (name, worst, moved)
        for ours, theirs in zip(read_metrics(runs[name] / "metrics.jsonl"), read_metrics(runs["one"] / "metrics.jsonl")):
            assert ours["reward"] == pytest.approx(theirs["reward"], abs=1e-6)
            assert ours["kl"] == pytest.approx(theirs["kl"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_ppo_runs_on_the_embedded_model_against_a_reward_model_trained_here(tmp_path):
    from medgpt.cli import main

    rm = tmp_path / "rm"
    assert main(["rm", "model_name_or_path=smollm2-135m", f"train_file_dir={DEMO / 'preference'}", f"output_dir={rm}",
                 "max_steps=2", "per_device_train_batch_size=2", "max_length=256", "report_to=none"]) == 0
    out = tmp_path / "ppo"
    assert main(["ppo", "model_name_or_path=smollm2-135m", f"train_file_dir={DEMO / 'grpo'}", f"output_dir={out}",
                 f"reward_model_name_or_path={rm}", "max_steps=2", "rollout_batch_size=2",
                 "per_device_train_batch_size=2", "max_new_tokens=16", "max_prompt_length=128", "ppo_epochs=1",
                 "save_strategy=no"]) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and math.isfinite(results["train_reward"])
    # RM and PPO start from the same model: the reward model is an adapter of the policy's base, scored from ids
    assert results["reward_model_shares_base"] and 1.0 < results["roles_memory_over_base"] < 1.1
    rows = read_metrics(out / "metrics.jsonl")
    assert all(math.isfinite(r["reward_reward_model"]) and r["response_length"] > 0 for r in rows)
    assert (out / "adapter_model.safetensors").is_file() and (out / "ppo.png").is_file()
    # the report reads the last rollouts' KL against the target from the results (None: fixed kl_coef)
    assert results["final_kl"] == pytest.approx(rows[-1]["kl"]) and results["target_kl"] is None
