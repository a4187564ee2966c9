"""TRL's online trainers (GRPO, RLOO, on-policy distillation) on our prompts, template and policy.

TRL renders conversational prompts itself, with the tokenizer's own template and without our tool handling.
`ChatFormatPrompts` gives those trainers their prompt ids from `ChatFormat.prompt_ids` instead: the exact render
SFT trained on (a named fallback template, tool definitions folded into the system turn for templates without
tool support), and generation stops at the template's end-of-turn token (`stop_at_end_of_turn`).

A dataset row:
- `prompt`: TRL's conversational prompt (role/content dicts), what reward functions receive as `prompts`;
- `conversation`: the exact messages and tools as JSON, what the template and the reward model read;
- `reference`: the answer to compare with (a QA answer, an MCQ letter, the last assistant reply of a
  conversation, the chosen reply of a pair), or None;
- `reference_kind`: "choice" (an MCQ option letter), "text", or "none".

`prepare_prompts` and `prepare_policy` are the part of those stages' recipes that is the same for all three:
prompts validated before any weights load, the policy prepared as in every stage (LoRA, QLoRA or full).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from medgpt.config import RunConfig
from medgpt.data.loading import load_stage_data
from medgpt.data.records import MCQRecord, Message
from medgpt.data.templates import ChatFormat
from medgpt.models.adapters import start_from_adapter
from medgpt.models.load import load_tokenizer
from medgpt.rl.prompts import PROMPT_KINDS, record_prompt
from medgpt.training.recipe import add_new_tokens, begin_run, prepare_model, start_logs


def encode_conversation(messages: list[Message], tools: list[dict] | None) -> str:
    return json.dumps({"messages": [dataclasses.asdict(m) for m in messages], "tools": tools}, ensure_ascii=False)


def decode_conversation(text: str) -> tuple[list[Message], list[dict] | None]:
    data = json.loads(text)
    return [Message(**m) for m in data["messages"]], data["tools"]


def prompt_row(record) -> dict[str, Any]:
    prompt = record_prompt(record)
    kind = "none" if prompt.reference is None else ("choice" if isinstance(record, MCQRecord) else "text")
    return {
        "prompt": [{"role": m.role, "content": m.content} for m in prompt.messages],
        "conversation": encode_conversation(prompt.messages, prompt.tools),
        "reference": prompt.reference,
        "reference_kind": kind,
    }


def prompt_dataset(records):
    """A `datasets.Dataset` of prompt rows, or None for no records (e.g. no validation split)."""
    from datasets import Dataset

    return Dataset.from_list([prompt_row(r) for r in records]) if records else None


def stop_at_end_of_turn(model, chat_format) -> None:
    """Generation ends at the template's end-of-turn token(s) as well as EOS (TRL reads this list)."""
    model.generation_config.eos_token_id = chat_format.stop_token_ids()


class ChatFormatPrompts:
    """Mixin for TRL's GRPO / RLOO / distillation trainers: prompt ids come from our `ChatFormat`.

    TRL tokenises the prompts of a generation batch in `_tokenize_prompts(prompts)`, which sees only the
    role/content dicts; the rows' exact conversations are taken from the batch just before.
    """

    def __init__(self, *args, chat_format, **kwargs):
        self.chat_format = chat_format
        self._batch_conversations: list = []
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        self._batch_conversations = [decode_conversation(row["conversation"]) for row in inputs]
        return super()._generate_and_score_completions(inputs)

    def _tokenize_prompts(self, prompts):
        if len(prompts) != len(self._batch_conversations):
            raise RuntimeError(f"{len(prompts)} prompts to tokenise but {len(self._batch_conversations)} rows seen")
        ids = [self.chat_format.prompt_ids(messages, tools) for messages, tools in self._batch_conversations]
        return ids, None, {}  # prompt ids, images, multimodal fields


# ------------------------------------------------------------------------------------------------ stage recipe


@dataclass
class OnlineStart:
    """What an online stage has before any weights load."""

    tokenizer: Any
    chat_format: ChatFormat
    train: Any  # datasets.Dataset of prompt rows
    eval: Any  # the same for the validation split, or None
    resume: str | None  # the checkpoint to resume from
    start_adapter: str | None  # an unmerged SFT adapter that keeps training (its frozen copy is the reference)


def prepare_prompts(config: RunConfig) -> OnlineStart:
    """Prompts read and validated, the output directory checked, tokenizer and template ready."""
    data = load_stage_data(config.data, PROMPT_KINDS, config.training.seed)
    start_adapter = start_from_adapter(config)
    resume = begin_run(config)
    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_tokens_file)
    chat = ChatFormat(tokenizer, config.run.template)
    return OnlineStart(tokenizer, chat, prompt_dataset(data.train), prompt_dataset(data.eval), resume, start_adapter)


def prepare_policy(config: RunConfig, start: OnlineStart):
    """The policy as every stage prepares it (LoRA / QLoRA / full), stopping at end-of-turn; a fresh metrics log
    (unless resuming) and run_config.yaml in the output directory."""
    args = config.training
    # TRL defaults activation checkpointing on; ours (gradient_checkpointing, default off) decides.
    args.activation_checkpointing = args.gradient_checkpointing = config.model.gradient_checkpointing
    model = prepare_model(config, start.tokenizer, None, loss_chunk_size=1024)
    stop_at_end_of_turn(model, start.chat_format)
    start_logs(config, start.resume)
    return model
