"""The pipeline: references between stages, checks before training, skip / resume / --from, merges, the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEMO, ROOT
from medgpt.config import ConfigError
from medgpt.data.records import InvalidDataError
import medgpt.pipeline_evaluation as pipeline_module
from medgpt.evaluation import EvalSpec
from medgpt.pipeline import check_data, load_pipeline, run_pipeline, stage_state
from medgpt.report import read_metrics


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tiny_pipeline(tmp_path: Path, model: Path, **evaluation) -> dict:
    """PT -> SFT (LoRA, merged for its readers) -> RM; DPO from SFT; a few steps each on a tiny random Llama."""
    steps = {"max_steps": 2, "save_steps": 1, "eval_strategy": "no", "per_device_train_batch_size": 2}
    return {
        "output_dir": str(tmp_path / "out"),
        "defaults": {"seed": 1, "report_to": "none", "logging_steps": 1, "save_total_limit": 1},
        "stages": {
            "pt": {"config": "configs/pt.yaml", "model_name_or_path": str(model), "block_size": 64,
                   "max_train_samples": 40, **steps},
            "sft": {"config": "configs/sft.yaml", "model_name_or_path": "${pt.output}", "max_length": 128,
                    "max_train_samples": 16, "sample_prompts": 0, **steps},
            "rm": {"config": "configs/rm.yaml", "model_name_or_path": "${sft.output}", "max_length": 128,
                   "max_train_samples": 16, **steps},
            "dpo": {"config": "configs/dpo.yaml", "model_name_or_path": "${sft.output}", "max_length": 128,
                    "max_train_samples": 8, "gradient_accumulation_steps": 1, **steps, "save_total_limit": 2},
        },
        "evaluation": {"perplexity_file": str(DEMO / "eval" / "heldout_text.txt"),
                       "mcq_file": str(DEMO / "eval" / "mcq.jsonl"), "limit": 3, **evaluation},
    }


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # stage entries name configs/*.yaml relative to the repository


def test_references_resolve_to_merged_models_of_earlier_stages(tmp_path, tiny_model_dir, in_repo):
    pipeline = load_pipeline(write(tmp_path / "p.yaml", tiny_pipeline(tmp_path, tiny_model_dir)))
    out = tmp_path / "out"
    assert [s.name for s in pipeline.stages] == ["pt", "sft", "rm", "dpo"]
    assert pipeline.stage("sft").values["model_name_or_path"] == str(out / "pt-merged")  # LoRA read by sft: merged
    assert pipeline.stage("dpo").values["model_name_or_path"] == str(out / "sft-merged")
    assert pipeline.stage("rm").values["output_dir"] == str(out / "rm")
    assert pipeline.stage("dpo").inputs == ["sft"] and pipeline.stage("pt").inputs == []
    assert pipeline.model_of("rm") == out / "rm"  # nobody reads the reward model: no merge
    assert pipeline.stage("sft").values["seed"] == 1  # defaults reach every stage
    # a change upstream changes the fingerprint of everything downstream
    changed = tiny_pipeline(tmp_path, tiny_model_dir)
    changed["stages"]["pt"]["learning_rate"] = 1e-3
    other = load_pipeline(write(tmp_path / "q.yaml", changed))
    assert other.stage("dpo").fingerprint != pipeline.stage("dpo").fingerprint
    assert other.stage("pt").fingerprint != pipeline.stage("pt").fingerprint


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["stages"]["pt"].update(model_name_or_path="${sft.output}"), "only earlier stages"),
    (lambda p: p["defaults"].update(beta=0.1), "has no option"),  # DPO's beta means nothing to PT
    (lambda p: p["stages"]["sft"].update(output_dir="x"), "set by the pipeline"),
    (lambda p: p["stages"]["sft"].update(lerning_rate=1.0), "learning_rate"),
    (lambda p: p.update(stagez={}), "unknown top-level"),
    (lambda p: p["evaluation"].update(compare={"dpo": "nope"}), "not a stage"),
])
def test_bad_pipelines_fail_before_anything_runs(tmp_path, tiny_model_dir, in_repo, edit, message):
    data = tiny_pipeline(tmp_path, tiny_model_dir)
    edit(data)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write(tmp_path / "p.yaml", data))
    assert not (tmp_path / "out").exists()


def test_a_bad_data_line_in_a_later_stage_fails_before_the_first_stage(tmp_path, tiny_model_dir, in_repo):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "Q?", "chosen": "A"}) + "\n", encoding="utf-8")  # no rejected
    data = tiny_pipeline(tmp_path, tiny_model_dir)
    data["stages"]["dpo"]["train_file_dir"] = str(bad)
    pipeline = load_pipeline(write(tmp_path / "p.yaml", data))
    with pytest.raises(InvalidDataError, match=r"pairs.jsonl:1"):
        check_data(pipeline)
    with pytest.raises(InvalidDataError):
        run_pipeline(tmp_path / "p.yaml")
    assert not (tmp_path / "out" / "pt").exists()


@pytest.mark.slow
def test_pipeline_runs_skips_resumes_and_reruns_from_a_stage(tmp_path, tiny_model_dir, in_repo, private_cache):
    config = write(tmp_path / "p.yaml", tiny_pipeline(tmp_path, tiny_model_dir, open_file=str(DEMO / "eval" / "open_questions.jsonl"),
                                                      max_new_tokens=4, reward_model="${rm.adapter}",
                                                      compare={"dpo": "sft"},
                                                      preference_file=str(DEMO / "eval" / "preference_heldout.jsonl")))
    report = run_pipeline(config)
    out = tmp_path / "out"
    for name in ("pt", "sft", "rm", "dpo"):
        assert stage_state(load_pipeline(config), name)["status"] == "done"
        assert (out / name / "train_results.json").is_file()
    assert (out / "pt-merged" / "config.json").is_file() and (out / "sft-merged" / "config.json").is_file()
    assert not (out / "rm-merged").exists() and not (out / "dpo-merged").exists()
    for name in ("base", "pt", "sft", "dpo"):  # every chat model evaluated, the reward model not
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["perplexity"] > 1 and 0 <= metrics["mcq_accuracy"] <= 1
        assert "reward_accuracy" not in metrics  # held-out pairs measure the reward model, once
    held_out = json.loads((out / "eval" / "rm" / "metrics.json").read_text())
    assert held_out["reward_n"] == 40 and 0 <= held_out["reward_accuracy"] <= 1 and "perplexity" not in held_out
    assert "reward_mean" in json.loads((out / "eval" / "dpo" / "metrics.json").read_text())  # after the RM
    assert "reward_mean" not in json.loads((out / "eval" / "sft" / "metrics.json").read_text())  # before it
    wins = json.loads((out / "eval" / "win_rates.json").read_text())
    assert 0 <= wins["dpo_vs_sft"]["win_rate"] <= 1 and wins["dpo_vs_sft"]["judge"] == "rm"
    assert wins["dpo_vs_sft"]["win_rate_ci"][0] <= wins["dpo_vs_sft"]["win_rate"] and wins["dpo_vs_sft"]["win_n"] == 3
    text = report.read_text()
    for piece in ("| pt | pt | done", "| dpo | dpo | done", "Held-out perplexity base → pt", "MCQ accuracy pt → sft",
                  "Win rate dpo vs sft judged by `rm`", "on 40 held-out pairs",
                  "Sample answers", "![pt: loss](pt/loss.png)"):
        assert piece in text, piece
    assert "<table>" in (out / "report.html").read_text()

    # run again: nothing trains (results untouched)
    stamps = {n: (out / n / "train_results.json").stat().st_mtime_ns for n in ("pt", "sft", "rm", "dpo")}
    evaluated = {n: (out / "eval" / n / "metrics.json").stat().st_mtime_ns for n in ("base", "pt", "sft", "rm", "dpo")}
    run_pipeline(config)
    assert {n: (out / n / "train_results.json").stat().st_mtime_ns for n in stamps} == stamps
    assert {n: (out / "eval" / n / "metrics.json").stat().st_mtime_ns for n in evaluated} == evaluated

    # dpo killed after step 1 (state says running, step 2 and the final save missing) resumes from checkpoint-1
    state_file = out / ".pipeline" / "dpo.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "status": "running"}))
    (out / "dpo" / "train_results.json").unlink()
    shutil.rmtree(out / "dpo" / "checkpoint-2")
    assert (out / "dpo" / "checkpoint-1").is_dir()
    run_pipeline(config)
    result = json.loads((out / "dpo" / "train_results.json").read_text())
    assert result["global_step"] == 2
    steps = [row["step"] for row in read_metrics(out / "dpo" / "metrics.jsonl") if "loss" in row]
    assert steps == [1, 2]  # step 1 was not trained again
    assert stamps["sft"] == (out / "sft" / "train_results.json").stat().st_mtime_ns

    # --from rm reruns rm and dpo, not pt and sft
    run_pipeline(config, from_stage="rm")
    assert (out / "pt" / "train_results.json").stat().st_mtime_ns == stamps["pt"]
    assert (out / "rm" / "train_results.json").stat().st_mtime_ns != stamps["rm"]
    # the new reward model is measured again and re-scores the answers after it; the evaluations before it stand
    after = {n: (out / "eval" / n / "metrics.json").stat().st_mtime_ns for n in evaluated}
    assert after["sft"] == evaluated["sft"] and after["rm"] != evaluated["rm"] and after["dpo"] != evaluated["dpo"]


@pytest.mark.parametrize("open_questions", [True, False], ids=["open", "no-open"])
def test_each_evaluation_gets_only_what_it_can_measure(tmp_path, tiny_model_dir, in_repo, monkeypatch, open_questions):
    pairs = str(DEMO / "eval" / "preference_heldout.jsonl")
    extra = {"open_file": str(DEMO / "eval" / "open_questions.jsonl")} if open_questions else {}
    pipeline = load_pipeline(write(tmp_path / "p.yaml", tiny_pipeline(tmp_path, tiny_model_dir, **extra,
                                                                       reward_model="${rm.adapter}",
                                                                       preference_file=pairs)))
    specs = {}
    monkeypatch.setattr(pipeline_module, "_cached_evaluation",
                        lambda p, name, model, values, key: specs.setdefault(name, values))
    for name in ("base", "pt", "sft", "dpo"):  # rm is stage 3: dpo (stage 4) is judged by it, the others not
        pipeline_module.evaluate(pipeline, name, "m", "key")
    pipeline_module.evaluate_reward_model(pipeline, "rm", "key")
    for values in specs.values():
        EvalSpec(**values).check()  # every spec is one `medgpt eval` accepts
    assert [n for n, v in specs.items() if "preference_file" in v] == ["rm"]
    judged = [n for n, v in specs.items() if "reward_model" in v]
    assert judged == (["dpo", "rm"] if open_questions else ["rm"])
    assert specs["rm"]["reward_model"] == str(tmp_path / "out" / "rm")


def test_cli_check_prints_the_plan(tmp_path, tiny_model_dir, in_repo):
    config = write(tmp_path / "p.yaml", tiny_pipeline(tmp_path, tiny_model_dir))
    out = subprocess.run([sys.executable, "-m", "medgpt.cli", "pipeline", str(config), "--check"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "sft: sft ->" in out.stdout and "(reads pt)" in out.stdout and "configs and data are valid" in out.stdout


def test_judges_are_planned_and_a_judge_a_stage_trained_against_is_marked(tmp_path, tiny_model_dir, in_repo):
    from medgpt.pipeline_evaluation import judged_stages, judges_of, trained_against

    data = tiny_pipeline(tmp_path, tiny_model_dir, open_file=str(DEMO / "eval" / "open_questions.jsonl"),
                         reward_model="${rm.output}", compare={"dpo": "sft"},
                         judges={"rm_b": "${rm.output}", "big": {"url": "http://127.0.0.1:9/v1", "model": "m"}})
    data["stages"]["rm_b"] = {**data["stages"]["rm"]}  # a second reward model (the demo will train it on other pairs)
    data["stages"]["ppo"] = {"config": "configs/ppo.yaml", "model_name_or_path": "${sft.output}",
                             "reward_model_name_or_path": "${rm.output}", "max_steps": 1}
    data["evaluation"]["judges"]["rm_b"] = "${rm_b.output}"
    pipeline = load_pipeline(write(tmp_path / "p.yaml", data))
    judges = judges_of(pipeline)
    assert list(judges) == ["rm", "rm_b", "big"] and judges["big"] == {"url": "http://127.0.0.1:9/v1", "model": "m"}
    assert judged_stages(pipeline) == {"rm", "rm_b"}  # both are measured on the held-out pairs
    assert trained_against(pipeline, ("ppo", "sft"), judges["rm"]["model"]) == ["ppo"]
    assert trained_against(pipeline, ("ppo", "sft"), judges["rm_b"]["model"]) == []
    data["evaluation"]["judges"] = ["${rm.output}"]
    with pytest.raises(ConfigError, match="judges maps a name"):
        load_pipeline(write(tmp_path / "q.yaml", data))


def test_the_report_prints_intervals_and_calls_only_changes_outside_noise_real(tmp_path, tiny_model_dir, in_repo):
    from medgpt.pipeline_report import write_pipeline_report

    pipeline = load_pipeline(write(tmp_path / "p.yaml", tiny_pipeline(tmp_path, tiny_model_dir)))
    out = tmp_path / "out" / "eval"
    questions = [{"source": f"mcq.jsonl:{i}", "question": f"Q{i}", "answer": "A"} for i in range(60)]
    right = {"base": range(0, 20), "pt": range(0, 22), "sft": range(0, 50)}  # pt: noise; sft: real
    for name, which in right.items():
        rows = [{**q, "predicted": "A" if i in which else "B", "correct": i in which} for i, q in enumerate(questions)]
        (out / name).mkdir(parents=True)
        (out / name / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / name / "metrics.json").write_text(json.dumps({"mcq_accuracy": len(which) / 60,
                                                             "mcq_accuracy_ci": [0.1, 0.9], "mcq_n": 60}))
    (out / "win_rates.json").write_text(json.dumps({"dpo_vs_sft": {
        "win_rate": 0.6, "win_rate_ci": [0.45, 0.74], "win_n": 24, "wins": 12, "losses": 7, "ties": 5, "judge": "rm",
        "a": "dpo", "b": "sft", "trained_against": ["dpo"]}, "dpo_vs_sft_by_rm_b": {
        "win_rate": 0.75, "win_rate_ci": [0.6, 0.9], "win_n": 24, "wins": 17, "losses": 5, "ties": 2, "judge": "rm_b",
        "a": "dpo", "b": "sft", "trained_against": []}, "sft_vs_base": {
        "win_rate": 0.8, "win_rate_ci": [0.65, 0.92], "win_n": 24, "wins": 19, "losses": 4, "ties": 1, "judge": "rm",
        "a": "sft", "b": "base", "trained_against": []}}))
    (tmp_path / "out" / "dpo").mkdir(parents=True)  # an RL stage's last KL against its target (shape of ppo's)
    (tmp_path / "out" / "dpo" / "train_results.json").write_text(json.dumps({"final_kl": 7.25, "target_kl": 6.0}))
    text = write_pipeline_report(pipeline).read_text()
    assert "KL of dpo to its reference policy on its last rollouts: 7.25 nats per reply (target_kl 6): **above" in text
    # the judge dpo trained against sees no real change, the independent one a real gain: the report says so
    assert ("**Judges disagree** on dpo vs sft (`rm` (trained against): no real change; `rm_b` (independent): "
            "better)") in text
    assert "Judges agree" not in text and "on sft vs base" not in text  # one judge alone has nothing to agree with
    assert "| sft | 0.833 [0.100, 0.900] |" in text
    assert "MCQ accuracy base → pt: 0.333 → 0.367 (+0.033" in text and "within noise" in text.split("base → pt")[1]
    assert "a real change" in text.split("pt → sft")[1].split("\n")[0]
    assert "0.600 [0.450, 0.740] over 24 open questions" in text and "**not independent**: dpo" in text


def test_demo_pipeline_is_valid(in_repo):
    pipeline = load_pipeline(ROOT / "configs" / "demo.yaml")
    check_data(pipeline)
    assert [s.name for s in pipeline.stages] == ["pt", "sft", "rm", "rm_b", "ppo", "dpo"]
    # the two reward models train on disjoint halves of the same pairs: rm_b judges PPO independently
    assert {pipeline.stage(n).values["train_shard"] for n in ("rm", "rm_b")} == {"1/2", "2/2"}
    # PPO mounts the LoRA reward model on its base (the adapter directory); the evaluation judges with the merged
    # model, and still knows PPO trained against it (below)
    assert pipeline.stage("ppo").values["reward_model_name_or_path"] == str(Path("outputs/demo/rm"))
    assert pipeline.evaluation["reward_model"] == str(Path("outputs/demo/rm-merged"))
    from medgpt.pipeline_evaluation import judges_of, trained_against

    assert "limit" not in pipeline.evaluation and pipeline.evaluation["open_limit"] >= 24  # all 117 MCQs, 24 open
    judges = judges_of(pipeline)
    assert list(judges) == ["rm", "rm_b"] and judges["rm_b"]["model"] == str(Path("outputs/demo/rm_b-merged"))
    assert trained_against(pipeline, ("ppo", "sft"), judges["rm"]["model"]) == ["ppo"]
    assert trained_against(pipeline, ("ppo", "sft"), judges["rm_b"]["model"]) == []
