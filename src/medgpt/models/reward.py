"""Reward models: a scalar head read at each sequence's last real token, and the scorer RL stages call.

transformers' sequence-classification models pool at "the rightmost token that is not the pad id". With the
embedded tokenizer (and Qwen's, Llama 3's …) the pad token is the end-of-turn token `<|im_end|>`, which is also
the last real token of every rendered reply: HF's pooling then reads the position before it, or a padding
position, depending on the batch. Here the position comes from the attention mask instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from medgpt.arguments import ModelArguments
from medgpt.data.records import Message, PreferencePair
from medgpt.data.templates import ChatFormat

logger = logging.getLogger(__name__)


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last position whose mask is 1: `mask.sum(-1) - 1` under right padding, and
    still right under left padding (the last column)."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (columns * attention_mask.to(columns.dtype)).argmax(-1)


def use_last_token_reward(model) -> None:
    """Make `model(input_ids, attention_mask)` return `logits` (B, 1): the score head at each row's last real
    token — on this instance only, so peft / DDP / DeepSpeed wrappers around it all end up calling it.

    Only the pooled hidden states go through the head (B rows, not B x T). Without an attention mask every
    position is real and the last column is read. Packed rows (several sequences in one row, position ids
    restarting at each) pass `sequence_ends`: the flat index (into the B x T positions) of each sequence's last
    token, and get one score per sequence, (S, 1).
    """
    if getattr(model, "_medgpt_last_token_reward", False):
        return

    def forward(input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, sequence_ends=None, **kwargs):
        if labels is not None:
            raise ValueError("the reward model computes no loss itself: compute the pairwise loss from its logits")
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("return_dict", "use_cache")}
        outputs = model.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   use_cache=False, **kwargs)
        hidden = outputs.last_hidden_state  # (B, T, H)
        if sequence_ends is not None:
            pooled = hidden.reshape(-1, hidden.shape[-1])[sequence_ends.to(hidden.device)]  # (S, H)
        else:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            if attention_mask is None:
                last = torch.full_like(rows, hidden.shape[1] - 1)
            else:
                last = last_token_positions(attention_mask.to(hidden.device))
            pooled = hidden[rows, last]
        # Looked up per call: peft wraps `score` (modules_to_save) after this patch. The head runs in fp32 outside
        # autocast: a bf16 reward resolves only ~0.4% of its value, too coarse for the margins training compares.
        head = getattr(model, "score")
        with torch.autocast(hidden.device.type, enabled=False):
            logits = head(pooled.to(next(head.parameters()).dtype))
        return SequenceClassifierOutputWithPast(logits=logits)  # (B or S, num_labels)

    model.score.float()  # (H x 1): nothing to save by keeping it in 16 bits
    model.forward = forward
    model._medgpt_last_token_reward = True


def right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T): padding follows each sequence; the mask comes from lengths."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


class RewardModelScorer:
    """Score conversations with a reward model, rendered by the chat template it was trained with.

    `score(conversations)` gives one float per conversation (higher = preferred); `score_pairs(pairs)` gives
    the chosen and rejected rewards of preference pairs; `score_ids` scores already tokenised sequences (e.g.
    PPO rollouts). A conversation is tokenised exactly as RM training tokenised prompt + reply: through the
    last assistant turn's end-of-turn token.
    """

    def __init__(self, model, tokenizer, chat_format: ChatFormat, batch_size: int = 8, max_length: int | None = None):
        use_last_token_reward(_unwrapped(model))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.batch_size = batch_size
        self.max_length = max_length  # longer sequences keep their end (the reply), losing the oldest context

    @classmethod
    def load(cls, path: str, template: str | None = None, torch_dtype: str = "auto", device_map: str | None = None,
             trust_remote_code: bool = False, batch_size: int = 8,
             max_length: int | None = None) -> "RewardModelScorer":
        """A full / merged reward model directory, or a LoRA reward adapter (its base is loaded underneath)."""
        from medgpt.models.load import load_model, load_tokenizer, resolve_model_path
        from medgpt.serve.engine import saved_template_name

        path = resolve_model_path(path)
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"reward model directory {path} does not exist")
        adapter_file = directory / "adapter_config.json"
        adapter = json.loads(adapter_file.read_text(encoding="utf-8")) if adapter_file.is_file() else None
        if adapter is not None:
            if adapter.get("task_type") != "SEQ_CLS":
                raise ValueError(f"{path} is a {adapter.get('task_type')} adapter, not a reward model (SEQ_CLS): "
                                 "train one with `medgpt rm`")
            base = adapter["base_model_name_or_path"]
        else:
            _check_reward_config(directory)
            base = path
        tokenizer_source = path if (directory / "tokenizer_config.json").is_file() else base
        tokenizer = load_tokenizer(ModelArguments(model_name_or_path=tokenizer_source,
                                                  trust_remote_code=trust_remote_code))
        args = ModelArguments(model_name_or_path=base, torch_dtype=torch_dtype, device_map=device_map,
                              trust_remote_code=trust_remote_code)
        network = load_model(args, tokenizer, head="sequence_classification", purpose="inference")
        if adapter is not None:
            from peft import PeftModel

            from medgpt.models.merge import match_trained_vocabulary

            match_trained_vocabulary(network, tokenizer, directory)
            network = PeftModel.from_pretrained(network, path)  # the trained head comes from modules_to_save
        if device_map is None and torch.cuda.is_available():
            network = network.to("cuda")
        chat = ChatFormat(tokenizer, template or saved_template_name(path))
        return cls(network, tokenizer, chat, batch_size=batch_size, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        encoded = self.chat_format.encode(messages, tools)
        ids = encoded.input_ids[: encoded.turn_ends[-1]] if encoded.turn_ends else encoded.input_ids
        return ids[-self.max_length:] if self.max_length else ids

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of token id sequences, batched by similar length (less padding), returned in input order."""
        rewards = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            ids, mask = right_padded([sequences[i] for i in batch], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for i, value in zip(batch, logits[:, 0].float().tolist()):
                rewards[i] = value
        return rewards

    def score(self, conversations: list[list[Message]], tools: list[list[dict] | None] | None = None) -> list[float]:
        """One reward per conversation (ending with the assistant reply judged). `tools`: per conversation."""
        tools = tools or [None] * len(conversations)
        return self.score_ids([self.encode(c, t) for c, t in zip(conversations, tools, strict=True)])

    def score_pairs(self, pairs: list[PreferencePair]) -> tuple[list[float], list[float]]:
        """(chosen rewards, rejected rewards) of preference pairs."""
        rewards = self.score([p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs],
                             [p.tools for p in pairs] * 2)
        return rewards[: len(pairs)], rewards[len(pairs):]


def _unwrapped(model):
    """The transformers model under a peft wrapper (the instance whose forward is patched)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _check_reward_config(directory: Path) -> None:
    """Refuse a directory that is not a sequence-classification model: its head would be random."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{directory} holds neither a model (config.json) nor an adapter (adapter_config.json)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"{directory} is a {', '.join(architectures) or 'model'} without a reward head: "
                         "train a reward model with `medgpt rm` (or merge its adapter) and score with that")
