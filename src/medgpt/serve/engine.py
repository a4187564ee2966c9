"""The one generation engine: load a model (dir, hub name, alias, or base + adapter), render prompts with its
saved chat template, and generate: offline batches (`generate`, `generate_rows`) or rows that join a running
batch as they come (`submit`, `stream`), stopping at the template's end-of-turn tokens and the stop strings.

Chat, batch prediction, the API server, the web UI, evaluation and RL rollouts all go through it, two ways:
- `submit` / `stream` (API server, web UI, terminal chat): continuous batching (`medgpt.serve.batching`), so
  requests arriving at different times, with different options, progress together step by step.
- `generate` / `generate_rows` (evaluation, prediction, PPO rollouts, post-training samples): a known list of
  prompts in left-padded batches through `model.generate`, sampling with the global RNG (`seed` or the run's
  `torch.manual_seed`). These run on models being trained (gradient checkpointing, FSDP / DeepSpeed wrappers,
  PPO's live policy between optimizer steps), where a long-lived batching loop with its own KV cache and
  thread has no place.
Both cut the text with the same `medgpt.serve.rows.AnswerText`, so a stop string ends an answer at the same token
and `completion_tokens` counts the same tokens on either path. Logits are sampled in fp32 on both paths
(`generate` and the batching loop cast them), whatever dtype the model computes in.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from medgpt.arguments import ModelArguments
from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat
from medgpt.models.load import load_model, load_tokenizer, resolve_model_path
from medgpt.serve.rows import AnswerText, Completion, SamplingParams

__all__ = ["Completion", "GenerationEngine", "SamplingParams", "save_template_name", "saved_template_name"]

logger = logging.getLogger(__name__)

TEMPLATE_META = "medgpt_template.json"  # names the fallback template a model was trained with


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
        self.lock = threading.Lock()  # one offline generate() at a time per model; callers queue
        self.batcher = None  # the continuous batching loop, started by the first `submit`
        self.batcher_lock = threading.Lock()

    @classmethod
    def load(cls, model: str, template: str | None = None, torch_dtype: str = "auto",
             device_map: str | None = None, trust_remote_code: bool = False, load_in_4bit: bool = False,
             load_in_8bit: bool = False) -> "GenerationEngine":
        """Load a model directory, hub name or alias; a LoRA adapter directory loads its base underneath, the adapter
        merged into it (beside a 4/8-bit base)."""
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
            if not (load_in_4bit or load_in_8bit):
                # an engine only answers: the adapter folded into the weights once costs nothing per token, where
                # LoRA's side path runs beside every linear layer (the demo's 117 MCQs on its PT adapter: 42 s
                # unmerged, 29 s merged, on a 2-core CPU). A quantised base keeps the adapter beside it (merging
                # into 4/8-bit weights rounds them again).
                network = network.merge_and_unload()
        if device_map is None and torch.cuda.is_available() and not (load_in_4bit or load_in_8bit):
            network = network.to("cuda")
        template = template or saved_template_name(path)
        return cls(network, tokenizer, ChatFormat(tokenizer, template))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------------------------------- offline batches

    def answer_text(self, params: SamplingParams) -> AnswerText:
        """An empty answer under this model's stops and the request's."""
        return AnswerText(self.tokenizer, self.chat_format.stop_token_ids(),
                          (*self.chat_format.stop_strings, *params.stop), params.max_new_tokens)

    def completion_of(self, new_ids: list[int], params: SamplingParams, prompt_tokens: int = 0) -> Completion:
        """The completion a row of generated ids stands for: cut at its first stop, padding after it ignored."""
        answer = self.answer_text(params)
        for token in new_ids:
            if answer.done:
                break
            answer.add(token)
        answer.end("length" if answer.tokens >= params.max_new_tokens else "stop")
        return answer.completion(prompt_tokens)

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
        return kwargs

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return ids, mask

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
        if self.batcher is not None:
            return self._generate_in_batcher(all_prompts, params)
        _, answers = self._generate_batches(all_prompts, params, batch_size)
        for answer in answers:
            answer.end("length" if answer.tokens >= params.max_new_tokens else "stop")
        return [answer.completion(len(prompt)) for prompt, answer in zip(all_prompts, answers)]

    def _generate_in_batcher(self, all_prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """While the batching loop runs, it owns the model: `model.generate` beside it computed other tokens than
        the same request alone (measured: greedy answers changed while a stream was running). Requests join the
        loop instead, so they also answer exactly as `stream` does."""
        from medgpt.serve.batching import Waiter

        waiters = [Waiter() for _ in all_prompts]
        for prompt, waiter in zip(all_prompts, waiters):
            self.submit(prompt, params, waiter)
        for waiter in waiters:
            waiter.event.wait()
            if waiter.error is not None:
                raise waiter.error
        return [waiter.completion for waiter in waiters]

    def generate_rows(self, all_prompts: list[list[int]], params: SamplingParams, batch_size: int = 8) -> list[list[int]]:
        """The new token ids `generate` made for each prompt, as they come: a row that stopped early ends in
        padding (RL rollouts cut it themselves, keeping the end-of-turn token)."""
        return self._generate_batches(all_prompts, params, batch_size)[0]

    @torch.inference_mode()
    def _generate_batches(self, all_prompts: list[list[int]], params: SamplingParams,
                          batch_size: int) -> tuple[list[list[int]], list[AnswerText]]:
        from transformers import StoppingCriteriaList

        rows: list[list[int]] = []
        answers: list[AnswerText] = []
        with self.lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(all_prompts), batch_size):
                ids, mask = self._left_padded(all_prompts[start:start + batch_size])
                batch = [self.answer_text(params) for _ in range(ids.shape[0])]
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          stopping_criteria=StoppingCriteriaList([_AnswersEnded(batch)]),
                                          **self._generation_kwargs(params))
                rows += out[:, ids.shape[1]:].tolist()
                answers += batch
        return rows, answers

    # ---------------------------------------------------------------------------------------- rows as they come

    def start_batching(self, max_rows: int = 8, kv_cache_tokens: int | None = None, continuous: bool = True):
        """Start the batching loop that `submit` and `stream` join (the server does at start-up, with its limits;
        otherwise the first `submit` does, with these defaults). Returns it; later calls return the same one."""
        from medgpt.serve.batching import start_batcher

        with self.batcher_lock:
            if self.batcher is None:
                self.batcher = start_batcher(self.model, self.tokenizer, self.chat_format.stop_token_ids(),
                                             self.chat_format.stop_strings, max_rows, kv_cache_tokens, continuous)
            return self.batcher

    def submit(self, prompt: list[int], params: SamplingParams, listener):
        """Start one row now; `listener` gets its text pieces and its Completion (see `batching.RowListener`).
        Returns a handle whose `cancel()` drops the row at the next step."""
        return self.start_batching().submit(prompt, params, listener)

    def close(self) -> None:
        """Stop the batching loop (a later `submit` starts a new one)."""
        with self.batcher_lock:
            if self.batcher is not None:
                self.batcher.close()
                self.batcher = None

    def stream(self, messages: list[Message], params: SamplingParams | None = None,
               tools: list[dict] | None = None,
               on_finish: Callable[[Completion], None] | None = None) -> Iterator[str]:
        """Yield the answer to a conversation in text pieces as they are generated."""
        return self.stream_ids(self.chat_format.prompt_ids(messages, tools), params, on_finish)

    def stream_ids(self, prompt: list[int], params: SamplingParams | None = None,
                   on_finish: Callable[[Completion], None] | None = None) -> Iterator[str]:
        """Yield the continuation of a token-id prompt in text pieces; the row starts at once, in the running batch.

        Closing the iterator early (a client hung up, Ctrl-C) drops the row at the next step, so no tokens are
        computed for nobody. `on_finish` gets the Completion (token counts, finish reason; "cancelled" when the
        reader left first), which the text pieces alone cannot tell.
        """
        events: queue.SimpleQueue = queue.SimpleQueue()
        handle = self.submit(prompt, params or SamplingParams(), _QueueListener(events))
        return _pieces(events, handle, on_finish)


class _QueueListener:
    def __init__(self, events: queue.SimpleQueue):
        self.events = events

    def piece(self, text: str) -> None:
        self.events.put(("piece", text))

    def done(self, completion: Completion) -> None:
        self.events.put(("done", completion))

    def failed(self, error: BaseException) -> None:
        self.events.put(("error", error))


def _pieces(events: queue.SimpleQueue, handle, on_finish) -> Iterator[str]:
    ended = False
    try:
        while True:
            kind, value = events.get()
            if kind == "piece":
                yield value
                continue
            ended = True
            if kind == "error":
                raise value
            if on_finish is not None:
                on_finish(value)
            return
    finally:
        if not ended:  # the reader left first
            partial = handle.cancel()
            if partial is not None and on_finish is not None:
                on_finish(partial)


class _AnswersEnded:
    """A stopping criterion for a left-padded batch: a row ends when its answer does (end-of-turn, stop string)."""

    def __init__(self, answers: list[AnswerText]):
        self.answers = answers

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for answer, token in zip(self.answers, input_ids[:, -1].tolist()):
            if not answer.done:
                answer.add(token)
        return torch.tensor([a.done for a in self.answers], dtype=torch.bool, device=input_ids.device)
