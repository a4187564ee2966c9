"""The `medgpt` command: subcommands only. Training stages come from the stage registry; tools take short flags."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap

from medgpt import __version__
from medgpt.config import OWN_SECTIONS
from medgpt.data.check import STAGE_KINDS
from medgpt.data.readers import FORMATS

logger = logging.getLogger("medgpt")

# ------------------------------------------------------------------------------------------ training


def options_help(classes) -> str:
    """Every option of a stage, grouped by section, with its type, default and help: the parameter manual."""
    lines = []
    seen = set()
    for cls in classes:
        lines.append(f"\n{cls.__name__}:" + (f" {cls.__doc__.strip().splitlines()[0]}" if cls.__doc__ else ""))
        for f in dataclasses.fields(cls):
            if not f.init or f.name in seen or f.name.startswith("_"):
                continue
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                "[]" if f.default_factory is not dataclasses.MISSING else "required")
            text = " ".join(str(f.metadata.get("help", "")).split()) or "(no description upstream)"
            lines.append(f"  {f.name} (default: {default})")
            lines.extend(textwrap.wrap(text, 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def run_training(stage_name: str | None, tokens: list[str]) -> int:
    from medgpt.config import ALIASES, load_config, read_yaml
    from medgpt.stages import get_stage, load_stages

    config_file = tokens[0] if tokens and tokens[0].endswith((".yaml", ".yml")) else None
    overrides = tokens[1:] if config_file else tokens
    if stage_name is None:
        if not config_file:
            raise SystemExit("usage: medgpt train CONFIG.yaml [key=value …]")
        stage_name = read_yaml(config_file).get("stage")
        if not stage_name:
            raise SystemExit(f"{config_file}: says no `stage:` (one of {', '.join(load_stages()) or 'none yet'})")
    stage = get_stage(stage_name)
    if "-h" in overrides or "--help" in overrides:
        classes = [*OWN_SECTIONS, *stage.extra_classes, stage.training_class]
        print(f"medgpt {stage.name} [CONFIG.yaml] [key=value …] [--key value …]\n\n{stage.summary}\n"
              f"Aliases accepted: " + ", ".join(f"{a} -> {b}" for a, b in ALIASES.items()) + options_help(classes))
        return 0
    config = load_config(stage, config_file, overrides)
    stage.run(config)
    return 0


# ------------------------------------------------------------------------------------------ tools


def cmd_data_check(args) -> int:
    from medgpt.data.check import check_paths, format_report
    from medgpt.data.readers import ReadOptions

    chat_format = None
    if args.model:
        from medgpt.arguments import ModelArguments
        from medgpt.data.templates import ChatFormat
        from medgpt.models.load import load_tokenizer

        tokenizer = load_tokenizer(ModelArguments(model_name_or_path=args.model, trust_remote_code=args.trust_remote_code))
        chat_format = ChatFormat(tokenizer, args.template)
    options = ReadOptions(args.format, args.text_separator)
    checks = check_paths(args.paths, args.stage, options, chat_format)
    print(format_report(checks, args.max_errors))
    return 1 if any(c.errors for c in checks) else 0


def load_engine(args, model: str | None = None):
    from medgpt.serve.engine import GenerationEngine

    return GenerationEngine.load(model or args.model, template=args.template, torch_dtype=args.dtype,
                                 trust_remote_code=args.trust_remote_code)


def sampling_params(args):
    from medgpt.serve.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def cmd_chat(args) -> int:
    from medgpt.serve.chat import ChatSession, run_chat

    run_chat(ChatSession(load_engine(args), sampling_params(args), args.system), questions=args.ask)
    return 0


def cmd_predict(args) -> int:
    from medgpt.data.readers import ReadOptions
    from medgpt.serve.predict import PredictionFileError, predict, read_prompts

    prompts = read_prompts(args.data, ReadOptions(args.format), args.system)  # data errors before the model loads
    try:
        summary = predict(load_engine(args), prompts[: args.limit], args.output, sampling_params(args), args.batch_size)
    except PredictionFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rate = summary.completion_tokens / summary.seconds if summary.seconds else 0.0
    print(f"{args.output}: {summary.written} answers written, {summary.skipped} already there; "
          f"{summary.prompt_tokens} prompt + {summary.completion_tokens} generated tokens "
          f"in {summary.seconds:.1f} s ({rate:.1f} generated tokens/s)")
    return 0


def cmd_serve(args) -> int:
    import os
    from pathlib import Path

    from medgpt.serve import check_api_exposure, require_extra

    api_key = args.api_key or os.environ.get("MEDGPT_API_KEY")
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    check_api_exposure(args.host, api_key)  # before any model loads
    if args.engine == "vllm":
        return serve_with_vllm(args, name, api_key)
    require_extra("serve", "fastapi", "uvicorn")
    from medgpt.serve.api import ServerSettings, run_server

    settings = ServerSettings(name, api_key, max_tokens_limit=args.max_tokens_limit, max_pending=args.max_queue,
                              max_batch=args.max_batch, max_prompts=args.max_prompts,
                              max_request_tokens=args.max_request_tokens, kv_cache_tokens=args.kv_cache_tokens,
                              cors_origins=tuple(args.cors_origin or ()))
    run_server(load_engine(args), settings, args.host, args.port)
    return 0


def serve_with_vllm(args, name: str, api_key: str | None) -> int:
    import tempfile

    from medgpt.config import ConfigError
    from medgpt.serve.vllm_server import run_vllm, vllm_command

    if not args.vllm_python:
        raise ConfigError("--engine vllm needs --vllm-python PATH: the python of the environment vLLM is installed in")
    with tempfile.TemporaryDirectory(prefix="medgpt-vllm-") as workdir:
        command = vllm_command(args.vllm_python, args.model, args.host, args.port, name, args.template, args.dtype,
                               args.trust_remote_code, workdir, args.vllm_args)
        return run_vllm(command, api_key)


def cmd_web(args) -> int:
    import os
    from pathlib import Path

    from medgpt.config import ConfigError
    from medgpt.serve import require_extra
    from medgpt.serve.web import build_ui, check_web_exposure, launch

    require_extra("serve", "gradio")
    auth = args.auth or os.environ.get("MEDGPT_WEB_AUTH")
    if auth and ":" not in auth:
        raise ConfigError("--auth takes USER:PASSWORD")
    login = tuple(auth.split(":", 1)) if auth else None
    check_web_exposure(args.host, login)  # before any model loads
    engines = {}
    for model in [args.model, *([args.compare] if args.compare else [])]:
        name = Path(model.rstrip("/")).name
        engines[name if name not in engines else f"{name} (2)"] = load_engine(args, model)
    launch(build_ui(engines, args.system or "", sampling_params(args)), args.host, args.port, login)
    return 0


def cmd_merge(args) -> int:
    from medgpt.models.merge import merge_adapter

    try:
        merge_adapter(args.adapter, args.output, dtype=args.dtype, base=args.base,
                      trust_remote_code=args.trust_remote_code, dequantize=args.dequantize)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {args.output}")
    return 0


def cmd_score(args) -> int:
    import json

    from medgpt.data.readers import ReadOptions, read_records
    from medgpt.data.records import PreferencePair
    from medgpt.models.reward import RewardModelScorer

    # Read and validate the data before loading any model.
    records = read_records(args.data, ("preference", "conversation"), ReadOptions(args.format)).records
    try:
        scorer = RewardModelScorer.load(args.reward_model, template=args.template, torch_dtype=args.dtype,
                                        trust_remote_code=args.trust_remote_code, batch_size=args.batch_size,
                                        max_length=args.max_length)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pairs = [r for r in records if isinstance(r, PreferencePair)]
    conversations = [r for r in records if not isinstance(r, PreferencePair)]
    chosen, rejected = scorer.score_pairs(pairs) if pairs else ([], [])
    rewards = scorer.score([c.messages for c in conversations], [c.tools for c in conversations])
    rows = [{"source": str(p.source), "chosen": c, "rejected": r, "chosen_wins": c > r}
            for p, c, r in zip(pairs, chosen, rejected)]
    rows += [{"source": str(c.source), "reward": value} for c, value in zip(conversations, rewards)]
    for row in rows:
        if "reward" in row:
            print(f"{row['source']}  reward {row['reward']:+.4f}")
        else:
            verdict = "chosen wins" if row["chosen_wins"] else "rejected wins"
            print(f"{row['source']}  chosen {row['chosen']:+.4f}  rejected {row['rejected']:+.4f}  {verdict}")
    if pairs:
        wins = sum(row.get("chosen_wins", False) for row in rows)
        print(f"accuracy: {wins / len(pairs):.4f} ({wins}/{len(pairs)} pairs ranked chosen above rejected)")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return 0


def cmd_eval(args) -> int:
    from medgpt.evaluation import EvalSpec, evaluate_model, format_metrics

    spec = EvalSpec(perplexity_file=args.perplexity, mcq_file=args.mcq, mcq_format=args.mcq_format,
                    mcq_split=args.mcq_split, mcq_subset=args.mcq_subset, subjects=args.subjects,
                    medmcqa_numbering=args.medmcqa_numbering, mcq_scoring=args.mcq_scoring,
                    mcq_prompt=args.mcq_prompt, mcq_cot=args.mcq_cot, mcq_max_new_tokens=args.mcq_max_new_tokens,
                    few_shot=args.few_shot, few_shot_file=args.few_shot_file,
                    few_shot_from_eval_set=args.few_shot_from_eval_set, preference_file=args.preference,
                    reward_model=args.reward_model, open_file=args.open, compare_with=args.compare_with,
                    judges=[*args.judge_model, *args.judge_url], judge_model_name=args.judge_url_model,
                    limit=args.limit, open_limit=args.open_limit, max_new_tokens=args.max_new_tokens,
                    max_length=args.max_length,
                    batch_size=args.batch_size, template=args.template, torch_dtype=args.dtype,
                    trust_remote_code=args.trust_remote_code, seed=args.seed)
    try:
        metrics = evaluate_model(args.model, spec, args.output)
    except ValueError as err:  # a reward model without a head, answer files without a common question …
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    if args.output:
        print(f"written to {args.output}/ (metrics.json, answers and per-question choices)")
    return 0


def cmd_plan(args) -> int:
    from medgpt.plan.memory import ZERO_STAGES, Setup
    from medgpt.plan.verdict import default_bits, hardware_for, report

    hardware = hardware_for(args.gpu, args.gpu_memory)
    setup = Setup(stage=args.stage, method=args.method, bits=args.bits or default_bits(args.method, hardware),
                  batch=args.batch, max_length=args.max_length, gpus=args.gpus, zero=ZERO_STAGES.get(args.deepspeed, 0),
                  gradient_checkpointing=args.gradient_checkpointing, optim=args.optim, lora_rank=args.lora_rank,
                  lora_targets=args.lora_targets, lora_dropout=args.lora_dropout,
                  trainable_layers=args.trainable_layers)
    print(report(args.model, setup, hardware, args.trust_remote_code))
    return 0


def cmd_pipeline(args) -> int:
    from medgpt.pipeline import check_data, load_pipeline, run_pipeline

    if args.check:
        pipeline = load_pipeline(args.config)
        check_data(pipeline)
        for planned in pipeline.stages:
            reads = f" (reads {', '.join(planned.inputs)})" if planned.inputs else ""
            print(f"{planned.name}: {planned.stage.name} -> {planned.output}{reads}")
        print("configs and data are valid")
        return 0
    report = run_pipeline(args.config, from_stage=args.from_stage)
    print(f"report: {report} (and {report.with_suffix('.html')})")
    return 0


def add_model_flags(p) -> None:
    p.add_argument("--model", required=True, help="model dir, adapter dir, hub name or smollm2-135m")
    p.add_argument("--template", help="named chat template (default: the one saved with the model)")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repo (off: safer)")


def add_sampling_flags(p, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=temperature, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep the smallest set of tokens "
                                                            "holding this probability mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeating tokens")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")


def add_tool_commands(commands) -> None:
    p = commands.add_parser("pipeline", help="run stages in order (PT -> SFT -> RM -> PPO / DPO …), evaluate, report")
    p.add_argument("config", help="pipeline YAML (see configs/demo.yaml)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun from this stage on (finished ones are "
                   "otherwise skipped and an interrupted one resumes)")
    p.add_argument("--check", action="store_true", help="validate every stage's config and data, print the plan, exit")
    p.set_defaults(func=cmd_pipeline)

    check = commands.add_parser("data", help="inspect training data").add_subparsers(dest="data_command", required=True)
    p = check.add_parser("check", help="validate data files: format, counts, every error as file:line: field: problem")
    p.add_argument("paths", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--stage", choices=sorted(STAGE_KINDS),
                   help="also check that the records suit this stage")
    p.add_argument("--model", help="tokenizer to report token lengths with (name, dir or smollm2-135m)")
    p.add_argument("--template", help="named chat template for the token count (default: the tokenizer's)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="force a format instead of detecting it")
    p.add_argument("--text-separator", default="line", choices=["line", "blank_line"],
                   help=".txt documents: one per line (default) or separated by blank lines")
    p.add_argument("--max-errors", type=int, default=50, help="errors shown per file")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repo (off: safer)")
    p.set_defaults(func=cmd_data_check)

    p = commands.add_parser("chat", help="talk to a model in the terminal (or answer --ask questions and exit)")
    add_model_flags(p)
    p.add_argument("--ask", action="append", help="answer this question and exit (repeatable; each on its own)")
    p.add_argument("--system", help="system prompt (in the chat: /system TEXT)")
    add_sampling_flags(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("predict", help="answer every prompt of a data file in batches, to JSONL (resumable)")
    add_model_flags(p)
    p.add_argument("--data", required=True,
                   help="prompts: conversation files (the last reply becomes the reference), question/answer, "
                        "multiple-choice, preference or KTO files, or .txt with one question per line; a file, "
                        "folder or glob")
    p.add_argument("--output", required=True,
                   help="JSONL to append to: id, source, messages, reference, output, finish_reason and token "
                        "counts per prompt. Ids already there are skipped, so rerunning continues a stopped run")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together; lower it if memory runs out")
    p.add_argument("--system", help="system prompt for prompts that have none")
    p.add_argument("--limit", type=int, help="answer only the first N prompts")
    p.add_argument("--format", default="auto", choices=FORMATS, help="force a data format instead of detecting it")
    add_sampling_flags(p, temperature=0.0)
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("serve", help="OpenAI-compatible API server (/v1/chat/completions, /v1/completions)")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything beyond loopback (e.g. 0.0.0.0) requires an API key")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", help="clients must send `Authorization: Bearer KEY` (default: $MEDGPT_API_KEY; "
                                     "optional on loopback)")
    p.add_argument("--served-model-name", help="the `model` clients ask for (default: the model directory's name)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="refuse requests asking for more tokens")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting or running at once; more are answered 503 (retry later)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="answers generated together: requests join and leave the running batch at every step")
    p.add_argument("--max-prompts", type=int, default=16, help="prompts one /v1/completions request may hold")
    p.add_argument("--max-request-tokens", type=int, default=65536,
                   help="generation budget of one request (prompts x n x max_tokens); more is refused with 400")
    p.add_argument("--kv-cache-tokens", type=int,
                   help="KV cache of the running batch, in tokens (default: 1024 per --max-batch row on CPU; on "
                        "a GPU, sized from its free memory); a prompt + max_tokens longer than it is refused")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let web pages from this origin call the API from a browser (repeatable; e.g. "
                        "http://localhost:3000, or * for any)")
    p.add_argument("--engine", default="medgpt", choices=["medgpt", "vllm"],
                   help="medgpt: this process on transformers (CPU or GPU); vllm: start vLLM's OpenAI server from "
                        "another Python environment (--vllm-python), much faster on GPUs")
    p.add_argument("--vllm-python", help="python of the environment vLLM is installed in (--engine vllm)")
    p.add_argument("--vllm-args", default="",
                   help="more vLLM server options, one string (e.g. \"--tensor-parallel-size 2 --max-model-len 8192\")")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("web", help="chat in the browser (Gradio); --compare answers with two models side by side")
    add_model_flags(p)
    p.add_argument("--compare", help="a second model for the side-by-side tab (e.g. SFT vs PPO output)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; beyond loopback --auth is required")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--auth", help="USER:PASSWORD login (default: $MEDGPT_WEB_AUTH; optional on loopback)")
    p.add_argument("--system", help="initial system prompt")
    add_sampling_flags(p, temperature=0.7)
    p.set_defaults(func=cmd_web)

    p = commands.add_parser("merge", help="merge a LoRA adapter into its base model and save a plain model")
    p.add_argument("--adapter", required=True, help="adapter directory (has adapter_config.json)")
    p.add_argument("--output", required=True, help="new directory for the merged model (refused if not empty)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights dtype saved: auto keeps the load dtype (fp32 on CPU, bf16 on recent GPUs); "
                        "bf16 halves the size with fp32's range; fp16 only for runtimes without bf16")
    p.add_argument("--base", help="base model to merge into (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dequantize", default="auto", choices=["auto", "on", "off"],
                   help="QLoRA / 8-bit adapters: merge into the base quantised as in training and dequantised to "
                        "16/32-bit weights, so the merged model computes what the adapter model did. auto: when the "
                        "adapter's run_config.yaml says load_in_4bit/load_in_8bit (needs bitsandbytes); on: always "
                        "(4-bit NF4 unless the run says 8-bit); off: into the base's original weights")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repo (off: safer)")
    p.set_defaults(func=cmd_merge)

    p = commands.add_parser("score", help="score preference pairs or conversations with a reward model")
    p.add_argument("--reward-model", required=True, help="reward model dir (`medgpt rm` output: adapter or merged)")
    p.add_argument("--data", required=True,
                   help="preference file(s) (prints chosen/rejected rewards and accuracy) or conversation file(s) "
                        "(one reward each): a file, folder or glob")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass; lower it if memory runs out")
    p.add_argument("--max-length", type=int, help="keep at most this many tokens per sequence (its end, the reply)")
    p.add_argument("--output", help="also write one JSON line of rewards per record to this file")
    p.add_argument("--format", default="auto", choices=FORMATS, help="force a data format instead of detecting it")
    p.add_argument("--template", help="named chat template (default: the one saved with the reward model)")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repo (off: safer)")
    p.set_defaults(func=cmd_score)

    from medgpt.evaluation.benchmarks import FORMATS as MCQ_FORMATS
    from medgpt.evaluation.mcq import PROMPTS as MCQ_PROMPTS, SCORINGS as MCQ_SCORINGS
    from medgpt.evaluation.spec import DEFAULT_SCORING

    p = commands.add_parser("eval", help="perplexity, accuracy on medical benchmarks (MedQA, MedMCQA, PubMedQA, "
                                         "CMExam, CMB, MMLU, CMMLU), reward accuracy, answers and judged win rates "
                                         "of a model (dir, adapter, hub name or alias), each with a 95%% interval")
    add_model_flags(p)
    p.add_argument("--perplexity", help="held-out text (.txt a document per line, or .jsonl with `text`): "
                                        "token-weighted perplexity, each document scored alone")
    p.add_argument("--mcq", help="a multiple-choice benchmark as downloaded (.csv/.json/.jsonl/.parquet file or "
                                 "folder; a dataset name or a local dataset folder with --mcq-split), its format "
                                 "detected from the columns")
    p.add_argument("--mcq-format", default="auto", choices=MCQ_FORMATS,
                   help="force the benchmark format instead of detecting it")
    p.add_argument("--mcq-split", help="split of a dataset name or local dataset folder (read by datasets."
                                       "load_dataset; default test)")
    p.add_argument("--mcq-subset", help="the dataset's config name (e.g. an MMLU subject on cais/mmlu)")
    p.add_argument("--subjects", help="keep only these categories (comma-separated); `medical` = MMLU's anatomy, "
                                      "clinical_knowledge, college_biology, college_medicine, medical_genetics, "
                                      "professional_medicine and CMMLU's medical subjects")
    p.add_argument("--medmcqa-numbering", default="auto", choices=["auto", "hub", "original"],
                   help="MedMCQA `cop`: hub = 0-based class index, original = 1-based; auto: a 0 or a 4 in the "
                        "file decides, else hub")
    p.add_argument("--mcq-scoring", default=DEFAULT_SCORING, choices=MCQ_SCORINGS,
                   help="mean: log-likelihood per token of the option text (default, measured best on the demo "
                        "set); sum / char / byte: summed, per character (lm-eval acc_norm), per byte (acc_bytes); "
                        "letter: likelihood of the letter alone; generate: greedy answer, letter read from it")
    p.add_argument("--mcq-prompt", default="chat", choices=MCQ_PROMPTS,
                   help="chat: the model's chat template; plain: lm-evaluation-harness's text format (base models, "
                        "numbers comparable with published lm-eval ones)")
    p.add_argument("--mcq-cot", action="store_true", help="with --mcq-scoring generate: reason step by step, then "
                                                          "answer (give --mcq-max-new-tokens room)")
    p.add_argument("--mcq-max-new-tokens", type=int, help="longest generated MCQ answer (default 16, 512 with --mcq-cot)")
    p.add_argument("--few-shot", type=int, default=0, help="solved examples shown before each question "
                                                           "(from --few-shot-file)")
    p.add_argument("--few-shot-file", help="where the examples come from: a dev split on disk, any benchmark format; "
                                           "the first N of the question's own category when it has enough")
    p.add_argument("--few-shot-from-eval-set", action="store_true",
                   help="draw the examples from the evaluated questions instead (never the question itself)")
    p.add_argument("--preference", help="held-out preference pairs: reward-model accuracy (needs --reward-model)")
    p.add_argument("--reward-model", help="reward model dir (`medgpt rm` output) for --preference, the mean reward "
                                          "of --open answers and --compare-with")
    p.add_argument("--open", help="open questions (question/answer or conversation file): greedy answers saved to "
                                  "answers.jsonl, scored by --reward-model when given")
    p.add_argument("--compare-with", help="answers.jsonl of another model (or a model to answer the same --open "
                                          "questions): win rate of --model over it, ties count half")
    p.add_argument("--judge-model", action="append", default=[],
                   help="another reward model judging the --compare-with win rate (repeatable); use one the "
                        "compared models were not trained against")
    p.add_argument("--judge-url", action="append", default=[],
                   help="an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1 of `medgpt serve`) asked a "
                        "fixed pairwise prompt in both orders (repeatable); key from $MEDGPT_JUDGE_API_KEY")
    p.add_argument("--judge-url-model", help="the model asked at --judge-url (default: the first it lists)")
    p.add_argument("--limit", type=int, help="use only the first N items of each file (generation on CPU is slow)")
    p.add_argument("--open-limit", type=int, help="only the first N open questions (default: --limit)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest open answer in tokens")
    p.add_argument("--max-length", type=int, default=1024,
                   help="tokens per scored sequence: documents keep their start, MCQ prompts their end")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass; lower it if memory runs out")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    p.add_argument("--output", help="directory for metrics.json, mcq.jsonl, answers.jsonl, perplexity.jsonl")
    p.set_defaults(func=cmd_eval)

    from medgpt.plan.memory import METHODS, OPTIMIZERS, STAGE_NEEDS, ZERO_STAGES
    from medgpt.plan.verdict import GPUS

    p = commands.add_parser("plan", help="will a training run fit in GPU memory? per-GPU estimate, verdict, fixes")
    p.add_argument("--model", required=True, help="model dir, adapter dir, hub name or smollm2-135m (reads config.json only)")
    p.add_argument("--stage", default="sft", choices=list(STAGE_NEEDS), help="training stage: sets the extra models "
                   "(reference, reward model, critic), pairs per sample and rollout KV cache")
    p.add_argument("--method", default="lora", choices=METHODS,
                   help="full (all weights), freeze (top layers), lora, qlora (LoRA on a 4-bit base)")
    p.add_argument("--bits", type=int, choices=[32, 16, 8, 4], help="bits per base weight: 32 = fp32 weights with "
                   "16-bit compute (AMP), 16 = bf16/fp16, 8/4 = bitsandbytes (LoRA only). Default: 4 for qlora, "
                   "16 on a GPU (32 for full training without bf16, and on CPU)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs training together (data parallel)")
    p.add_argument("--gpu", help=f"GPU model, sets memory and bf16 support: {', '.join(GPUS)}")
    p.add_argument("--gpu-memory", help="memory per GPU, e.g. 24GiB (overrides --gpu; default: this machine's GPU)")
    p.add_argument("--max-length", "--max_length", type=int, default=1024, help="tokens per sample (max_length / block_size)")
    p.add_argument("--batch", type=int, default=1, help="per-GPU micro-batch (per_device_train_batch_size)")
    p.add_argument("--deepspeed", choices=list(ZERO_STAGES), help="DeepSpeed ZeRO stage, split over --gpus")
    p.add_argument("--gradient-checkpointing", "--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward (less memory, ~30%% more compute)")
    p.add_argument("--optim", default="adamw_torch_fused", choices=list(OPTIMIZERS),
                   help="optimizer: AdamW with 32-bit states, or bitsandbytes 8-bit / paged")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-targets", default="all", help="`all` linear layers or a comma list such as q_proj,v_proj")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (its mask costs activation memory)")
    p.add_argument("--trainable-layers", type=int, default=2, help="freeze: how many top layers train")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repo (off: safer)")
    p.set_defaults(func=cmd_plan)


# ------------------------------------------------------------------------------------------ entry


def quiet_third_party_noise() -> None:
    """Hide import-time chatter that says nothing about the user's run."""
    import warnings

    # bitsandbytes announces an optional CPU kernel package at import; 4-bit works without it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft still calls transformers' renamed `is_gradient_checkpointing`
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")


def build_parser() -> argparse.ArgumentParser:
    from medgpt.stages import load_stages

    parser = argparse.ArgumentParser(
        prog="medgpt",
        description="Train a medical LLM: PT -> SFT -> RM -> PPO, DPO/ORPO/KTO, GRPO/RLOO, distillation.",
        epilog="Training commands take a YAML file and/or key=value overrides; `medgpt STAGE --help` lists every "
               "option with what it does and when to change it.",
    )
    parser.add_argument("--version", action="version", version=f"medgpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="run the stage named by a YAML file's `stage:`", add_help=False)
    train.set_defaults(training_stage=None)
    for stage in load_stages().values():
        commands.add_parser(stage.name, help=stage.summary, add_help=False).set_defaults(training_stage=stage.name)
    add_tool_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from medgpt.config import ConfigError
    from medgpt.data.records import InvalidDataError
    from medgpt.data.templates import TemplateError

    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party_noise()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if hasattr(args, "training_stage"):
            return run_training(args.training_stage, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except (ConfigError, InvalidDataError, TemplateError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
