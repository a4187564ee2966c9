"""A reward model that is a LoRA adapter of the policy's own base, mounted on the policy's base instead of loading
the base a second time; and the reward model as a reward, scored from the rollout's token ids.

The pipeline trains RM and PPO from the same merged SFT model, so the reward model is that base + a LoRA
adapter + a score head. Loading it as a third adapter of the policy's base costs the adapter's size instead of a
base model's. Same base means: the same directory, or configs equal (bar names, dtype, label fields) and weight
files with equal SHA-256; same tokenizer vocabulary; no full modules saved besides the score head (a reward
model trained with new tokens keeps its own embeddings). Any other reward model loads as `RewardModelScorer`.

Scoring from ids: when the reward model reads the policy's tokens as they are (same vocabulary, and its chat
template renders each prompt to the policy's prompt ids), it scores prompt ids + reply ids + its end-of-turn
tokens: what RM training saw for that reply, without decoding and re-tokenising. Otherwise the decoded reply is
rendered with the reward model's template.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat
from medgpt.models.load import resolve_model_path
from medgpt.models.reward import right_padded

logger = logging.getLogger(__name__)

HEAD_MODULES = {"score", "classifier"}  # the reward head peft saves as a full module
# config.json keys that differ between a causal LM and a classifier of the same weights, or do not matter
CONFIG_NOISE = {"_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version", "id2label",
                "label2id", "num_labels", "problem_type", "use_cache", "pad_token_id", "finetuning_task"}


def weights_digest(directory: Path) -> str:
    """SHA-256 over the model's weight files (names and bytes), read in 16 MB pieces."""
    digest = hashlib.sha256()
    files = sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")])
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for piece in iter(lambda: handle.read(1 << 24), b""):
                digest.update(piece)
    return digest.hexdigest() if files else ""


def _model_config(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if k not in CONFIG_NOISE}


def same_base(first: str, second: str) -> tuple[bool, str]:
    """Whether two model names/paths hold the same weights, and how that was decided."""
    a, b = Path(resolve_model_path(first)), Path(resolve_model_path(second))
    if a.exists() and b.exists() and a.resolve() == b.resolve():
        return True, "the same directory"
    if not (a.is_dir() and b.is_dir()):
        return str(a) == str(b), "the same hub name" if str(a) == str(b) else f"{a} and {b} differ"
    if not ((a / "config.json").is_file() and (b / "config.json").is_file()):
        return False, "no config.json to compare"
    if _model_config(a) != _model_config(b):
        return False, f"the configs of {a} and {b} differ"
    start = time.perf_counter()
    digests = weights_digest(a), weights_digest(b)
    logger.info("weights of %s and %s hashed in %.1f s", a, b, time.perf_counter() - start)
    if not digests[0] or digests[0] != digests[1]:
        return False, f"the weight files of {a} and {b} differ"
    return True, "equal configs and weight hashes"


@dataclass
class RewardAdapter:
    """A `medgpt rm` LoRA output, read for mounting on another copy of its base."""

    path: Path
    config: dict  # adapter_config.json
    lora_state: dict[str, torch.Tensor]  # peft's saved names, LoRA weights only
    head_weight: torch.Tensor  # (1, H)
    head_bias: torch.Tensor | None

    @classmethod
    def find(cls, reward_path: str, policy_base: str, policy_tokenizer) -> tuple["RewardAdapter | None", str]:
        """The reward model as an adapter of `policy_base`, or None and the reason it is not one."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        path = Path(resolve_model_path(reward_path))
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            return None, f"{path} is a full model, not an adapter"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("peft_type") != "LORA" or config.get("task_type") != "SEQ_CLS":
            return None, f"{path} is a {config.get('peft_type')} {config.get('task_type')} adapter, not a LoRA reward model"
        extra = set(config.get("modules_to_save") or []) - HEAD_MODULES
        if extra:
            return None, f"{path} trains full modules besides its head ({', '.join(sorted(extra))})"
        shared, why = same_base(config.get("base_model_name_or_path") or "", policy_base)
        if not shared:
            return None, f"its base is not the policy's: {why}"
        if (path / "tokenizer_config.json").is_file():
            reward_tokenizer = AutoTokenizer.from_pretrained(path)
            if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
                return None, "its tokenizer's vocabulary differs from the policy's"
        state = load_file(str(path / "adapter_model.safetensors"))
        heads = {k: v for k, v in state.items() if k.split(".")[-2] in HEAD_MODULES}
        weights = [v for k, v in heads.items() if k.endswith("weight")]
        if len(weights) != 1 or weights[0].shape[0] != 1:
            return None, f"{path} has no single-output score head ({sorted(heads)})"
        biases = [v for k, v in heads.items() if k.endswith("bias")]
        lora = {k: v for k, v in state.items() if "lora_" in k}
        return cls(path, config, lora, weights[0], biases[0] if biases else None), why

    def lora_config(self):
        """The adapter's LoRA settings for a causal-LM model, frozen, without the head module."""
        from peft import LoraConfig

        fields = {k: v for k, v in self.config.items() if k in LoraConfig.__dataclass_fields__}
        fields.update(task_type="CAUSAL_LM", modules_to_save=None, inference_mode=False, lora_dropout=0.0)
        return LoraConfig(**fields)

    def mount(self, peft_model, name: str) -> None:
        from medgpt.rl.actor_critic import load_adapter_state

        peft_model.add_adapter(name, self.lora_config())
        load_adapter_state(peft_model, name, self.lora_state)
        for param_name, param in peft_model.named_parameters():
            if name in param_name.split("."):
                param.requires_grad_(False)

    def score_head(self) -> nn.Linear:
        head = nn.Linear(self.head_weight.shape[1], 1, bias=self.head_bias is not None)
        with torch.no_grad():
            head.weight.copy_(self.head_weight.float())
            if self.head_bias is not None:
                head.bias.copy_(self.head_bias.float())
        return head.requires_grad_(False)


class AdapterRewardScorer:
    """`RewardModelScorer`'s interface (`score_ids`, `encode`, `chat_format`) over the shared reward adapter."""

    def __init__(self, network, tokenizer, chat_format: ChatFormat, batch_size: int = 8):
        self.network, self.tokenizer, self.chat_format, self.batch_size = network, tokenizer, chat_format, batch_size
        self.max_length = None

    def encode(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        encoded = self.chat_format.encode(messages, tools)
        return encoded.input_ids[: encoded.turn_ends[-1]] if encoded.turn_ends else encoded.input_ids

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        scores = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        device = next(self.network.policy.parameters()).device
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids, mask = right_padded([sequences[i] for i in rows], self.tokenizer.pad_token_id)
            with self.network.autocast():
                values = self.network.reward_scores(ids.to(device), mask.to(device)).tolist()
            for i, value in zip(rows, values):
                scores[i] = value
        return scores


def closing_ids(chat: ChatFormat) -> list[int] | None:
    """The tokens a template writes after an assistant reply's text through its end-of-turn (e.g. `<|im_end|>`),
    or None when a rendered prompt is not a token prefix of the rendered conversation (score from text then)."""
    probe = [Message("user", "hi"), Message("assistant", "ok")]
    encoded = chat.encode(probe)
    if not encoded.turn_ends:
        return None
    ids, prompt = encoded.input_ids[: encoded.turn_ends[-1]], chat.prompt_ids(probe[:1])
    reply = chat.tokenizer.encode("ok", add_special_tokens=False)
    if ids[: len(prompt)] != prompt or ids[len(prompt): len(prompt) + len(reply)] != reply:
        return None
    return ids[len(prompt) + len(reply):]


class ModelReward:
    """The reward model as a reward: one score per reply, from ids where the model reads the policy's tokens."""

    name = "reward_model"

    def __init__(self, scorer, policy_chat: ChatFormat):
        self.scorer, self.policy_chat = scorer, policy_chat
        same_vocabulary = scorer.tokenizer.get_vocab() == policy_chat.tokenizer.get_vocab()
        self.closing = closing_ids(scorer.chat_format) if same_vocabulary else None
        self.stop_ids = set(policy_chat.stop_token_ids())
        self.from_ids = self.from_text = 0  # replies scored each way, for the log

    def sequence(self, prompt, prompt_ids: list[int], reply_ids: list[int], reply_text: str) -> list[int]:
        if self.closing is not None and self.scorer.chat_format.prompt_ids(prompt.messages, prompt.tools) == \
                self.policy_chat.prompt_ids(prompt.messages, prompt.tools):
            body = list(reply_ids)
            while body and body[-1] in self.stop_ids:
                body.pop()
            self.from_ids += 1
            ids = prompt_ids + body + self.closing
        else:
            self.from_text += 1
            ids = self.scorer.encode([*prompt.messages, Message("assistant", reply_text)], prompt.tools)
        limit = self.scorer.max_length
        return ids[-limit:] if limit else ids

    def __call__(self, replies) -> list[float]:
        """One score per reply of a `medgpt.rl.scoring.Replies`."""
        rows = zip(replies.prompts, replies.prompt_ids, replies.ids, replies.texts)
        return self.scorer.score_ids([self.sequence(*row) for row in rows])
