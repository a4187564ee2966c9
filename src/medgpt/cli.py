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

DISCLAIMER = ("medgpt models are research software, not medical devices: answers can be wrong. "
              "Always consult a qualified clinician.")


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


def cmd_chat(args) -> int:
    from medgpt.data.records import Message
    from medgpt.serve.engine import GenerationEngine, SamplingParams

    engine = GenerationEngine.load(args.model, template=args.template, torch_dtype=args.dtype,
                                   trust_remote_code=args.trust_remote_code)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    system = [Message("system", args.system)] if args.system else []
    print(DISCLAIMER, flush=True)
    if args.ask:
        for question in args.ask:
            print(f"\n>>> {question}\n", flush=True)
            for piece in engine.stream([*system, Message("user", question)], params):
                print(piece, end="", flush=True)
            print(flush=True)
        return 0
    history: list[Message] = []
    print("Type a message; /reset clears the history, /exit quits.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append(Message("user", line))
        print("medgpt> ", end="", flush=True)
        answer = ""
        for piece in engine.stream([*system, *history], params):
            answer += piece
            print(piece, end="", flush=True)
        print()
        history.append(Message("assistant", answer.strip()))


def cmd_merge(args) -> int:
    from medgpt.models.merge import merge_adapter

    try:
        merge_adapter(args.adapter, args.output, dtype=args.dtype, base=args.base,
                      trust_remote_code=args.trust_remote_code)
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


def add_tool_commands(commands) -> None:
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
    p.add_argument("--model", required=True, help="model dir, adapter dir, hub name or smollm2-135m")
    p.add_argument("--ask", action="append", help="answer this question and exit (repeatable)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--template", help="named chat template (default: the one saved with the model)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (repeatable)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repo (off: safer)")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("merge", help="merge a LoRA adapter into its base model and save a plain model")
    p.add_argument("--adapter", required=True, help="adapter directory (has adapter_config.json)")
    p.add_argument("--output", required=True, help="new directory for the merged model (refused if not empty)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights dtype saved: auto keeps the load dtype (fp32 on CPU, bf16 on recent GPUs); "
                        "bf16 halves the size with fp32's range; fp16 only for runtimes without bf16")
    p.add_argument("--base", help="base model to merge into (default: the adapter's base_model_name_or_path)")
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
    except (ConfigError, InvalidDataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
