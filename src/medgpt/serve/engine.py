"""The one generation engine: load a model (dir, hub name, alias, or base + adapter), render prompts with its
saved chat template, generate in batches or stream, and stop at the template's end-of-turn tokens.

Chat, batch prediction, the API server, the web UI, evaluation and RL rollouts all go through it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from medgpt.arguments import ModelArguments
from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat
from medgpt.models.load import load_model, load_tokenizer, resolve_model_path

logger = logging.getLogger(__name__)

TEMPLATE_META = "medgpt_template.json"  # names the fallback template a model was trained with


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # extra stop strings, besides the template's end-of-turn


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn or stop string) | "length"


def saved_template_name(model_dir: str | Path) -> str | None:
    path = Path(model_dir) / TEMPLATE_META
    return json.loads(path.read_text(encoding="utf-8")).get("template") if path.is_file() else None


def save_template_name(model_dir: str | Path, name: str | None) -> None:
    if name:
        Path(model_dir, TEMPLATE_META).write_text(json.dumps({"template": name}), encoding="utf-8")


class GenerationEngine:
    def __init__(self, model, tokenizer, chat_format: ChatFormat):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.lock = threading.Lock()  # one generate() at a time per model; callers queue

    @classmethod
    def load(cls, model: str, template: str | None = None, torch_dtype: str = "auto",
             device_map: str | None = None, trust_remote_code: bool = False, load_in_4bit: bool = False,
             load_in_8bit: bool = False) -> "GenerationEngine":
        """Load a model directory, hub name or alias; a LoRA adapter directory loads its base underneath."""
        path = resolve_model_path(model)
        adapter_config = Path(path) / "adapter_config.json"
        base = json.loads(adapter_config.read_text())["base_model_name_or_path"] if adapter_config.is_file() else path
        args = ModelArguments(model_name_or_path=base, torch_dtype=torch_dtype, device_map=device_map,
                              trust_remote_code=trust_remote_code, load_in_4bit=load_in_4bit,
                              load_in_8bit=load_in_8bit)
        tokenizer_source = path if (Path(path) / "tokenizer_config.json").is_file() else base
        tokenizer = load_tokenizer(ModelArguments(model_name_or_path=tokenizer_source,
                                                  trust_remote_code=trust_remote_code))
        network = load_model(args, tokenizer, purpose="inference")
        if adapter_config.is_file():
            from peft import PeftModel

            from medgpt.models.merge import match_trained_vocabulary

            match_trained_vocabulary(network, tokenizer, Path(path))  # adapters trained with added tokens
            network = PeftModel.from_pretrained(network, path)
        if device_map is None and torch.cuda.is_available() and not (load_in_4bit or load_in_8bit):
            network = network.to("cuda")
        template = template or saved_template_name(path)
        return cls(network, tokenizer, ChatFormat(tokenizer, template))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------------------------------- batches

    def _generation_kwargs(self, params: SamplingParams) -> dict:
        sample = params.temperature > 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            eos_token_id=self.chat_format.stop_token_ids(),
            pad_token_id=self.tokenizer.pad_token_id,
            repetition_penalty=params.repetition_penalty,
        )
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)  # 0: off, not the model default 50
        else:  # the model's generation_config may carry sampling defaults; greedy must not warn about them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        stops = [s for s in (*self.chat_format.stop_strings, *params.stop) if len(self.tokenizer.encode(s, add_special_tokens=False)) > 1]
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        return kwargs

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return ids, mask

    def _finish(self, new_ids: list[int], params: SamplingParams) -> Completion:
        stop_ids = set(self.chat_format.stop_token_ids())
        cut = next((i for i, t in enumerate(new_ids) if t in stop_ids), None)
        kept = new_ids if cut is None else new_ids[:cut]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        reason = "stop" if cut is not None else "length"
        for stop in (*self.chat_format.stop_strings, *params.stop):
            if stop and stop in text:
                text, reason = text[: text.index(stop)], "stop"
        if reason == "length" and len(new_ids) < params.max_new_tokens:
            reason = "stop"  # a multi-token stop string ended generation
        return Completion(text, 0, len(kept) if cut is not None else len(new_ids), reason)

    def generate(self, conversations: list[list[Message]], params: SamplingParams | None = None,
                 tools: list[dict] | None = None, batch_size: int = 8) -> list[Completion]:
        """Answer each conversation (its last turn is the user's); batches are left-padded. An answer's text is
        stripped (`generate_ids` keeps a raw continuation's leading space)."""
        completions = self.generate_ids([self.chat_format.prompt_ids(c, tools) for c in conversations], params,
                                        batch_size)
        return [replace(c, text=c.text.strip()) for c in completions]

    def text_prompt_ids(self, text: str) -> list[int]:
        """A raw text prompt (no chat template), tokenised as the tokenizer does by default."""
        return self.tokenizer.encode(text)

    def generate_ids(self, all_prompts: list[list[int]], params: SamplingParams | None = None,
                     batch_size: int = 8) -> list[Completion]:
        """Continue each prompt of token ids (a rendered chat prompt or raw text)."""
        params = params or SamplingParams()
        results: list[Completion] = []
        for prompt, row in zip(all_prompts, self.generate_rows(all_prompts, params, batch_size)):
            completion = self._finish(row, params)
            completion.prompt_tokens = len(prompt)
            results.append(completion)
        return results

    @torch.inference_mode()
    def generate_rows(self, all_prompts: list[list[int]], params: SamplingParams, batch_size: int = 8) -> list[list[int]]:
        """The new token ids `generate` made for each prompt, as they come: a row that stopped early ends in
        padding (RL rollouts cut it themselves, keeping the end-of-turn token)."""
        rows: list[list[int]] = []
        with self.lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(all_prompts), batch_size):
                ids, mask = self._left_padded(all_prompts[start:start + batch_size])
                out = self.model.generate(input_ids=ids, attention_mask=mask, **self._generation_kwargs(params))
                rows += out[:, ids.shape[1]:].tolist()
        return rows

    # ---------------------------------------------------------------------------------------- streaming

    def stream(self, messages: list[Message], params: SamplingParams | None = None,
               tools: list[dict] | None = None,
               on_finish: Callable[[Completion], None] | None = None) -> Iterator[str]:
        """Yield the answer to a conversation in text pieces as they are generated."""
        return self.stream_ids(self.chat_format.prompt_ids(messages, tools), params, on_finish)

    def stream_ids(self, prompt: list[int], params: SamplingParams | None = None,
                   on_finish: Callable[[Completion], None] | None = None) -> Iterator[str]:
        """Yield the continuation of a token-id prompt in text pieces (a background thread runs `generate`).

        Generation stops as soon as the reader stops (a stop string was hit, or the iterator was closed because
        a client hung up), so no tokens are computed for nobody. `on_finish` gets the finished Completion
        (token counts, finish reason), which the text pieces alone cannot tell.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        params = params or SamplingParams()
        ids, mask = self._left_padded([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        kwargs = dict(input_ids=ids, attention_mask=mask, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancelled)]),
                      **self._generation_kwargs(params))
        errors: list[BaseException] = []

        def run():
            try:
                with self.lock, torch.inference_mode():
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    out = self.model.generate(**kwargs)
                if on_finish is not None:
                    completion = self._finish(out[0, ids.shape[1]:].tolist(), params)
                    completion.prompt_tokens = len(prompt)
                    on_finish(completion)
            except BaseException as err:  # surfaced in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ""
        stops = [s for s in (*self.chat_format.stop_strings, *params.stop) if s]
        try:
            for piece in streamer:
                text += piece
                hit = next((s for s in stops if s in text), None)
                if hit:
                    piece = piece[: len(piece) - (len(text) - text.index(hit))]
                    if piece:
                        yield piece
                    break
                yield piece
        finally:
            cancelled.set()
            thread.join()
        if errors:
            raise errors[0]


class _StopWhenSet:
    """A stopping criterion that ends generation once its event is set (the stream's reader went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
