"""Continuous batching: rows join and leave a running batch step by step, each with its own options and stops.

transformers' `ContinuousBatchingManager` (`model.init_continuous_batching()`, what `transformers serve` runs) does
the batching: a paged KV cache, a scheduler that admits waiting requests into the running batch every step and
drops finished or cancelled ones, chunked prefill, prefix sharing. medgpt adds what it lacks for our callers:
- per-row sampling with a per-row seed and repetition penalty (`medgpt.serve.sampling.RowSampler`);
- stop strings: its requests stop only at end-of-turn ids. Outputs are delivered in the generation thread
  itself (`_InlineRouter`), so a row whose text reaches a stop string is cancelled before the next step is
  scheduled, and a client that hangs up is dropped at the next step;
- a KV cache sized for CPU: the manager sizes its cache from free accelerator memory, which on CPU means from
  the machine's whole RAM; there medgpt sizes it (1024 tokens per row, or `--kv-cache-tokens`).

Its CUDA graphs and asynchronous double-buffering are turned off: the per-row sampler runs Python for each row
(a captured graph would freeze it), and reads each row's tokens so far when its step is prepared (the
double-buffered path prepares a step before the previous one's tokens are known).

Models it cannot run (remote-code architectures with their own attention and cache, for example) are found by a
one-token probe at start and served by `SerialBatcher` instead: one row at a time through `generate`, with the
same sampling, stops and cancellation.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import weakref

import torch

from medgpt.serve.rows import Completion, Row, RowBatcher, RowHandle, RowListener, SamplingParams
from medgpt.serve.sampling import OneRowSampler, RowSampling, sampler_processors

logger = logging.getLogger(__name__)

CPU_CACHE_TOKENS_PER_ROW = 1024  # default KV cache on CPU: this many tokens for each row of the batch
PREFILL_CHUNK = 512  # prompt tokens computed per step; a longer prompt is split so running rows keep going


# ------------------------------------------------------------------------------------------- continuous


class _InlineRouter:
    """The manager's output router, replaced: outputs go to `deliver` in the generation thread, not to a queue."""

    def __init__(self, deliver):
        self.deliver = deliver

    def deliver_batch(self, outputs) -> None:
        for output in outputs:
            self.deliver(output)

    def fail_and_deliver(self, state, error: Exception) -> None:
        from transformers.generation.continuous_batching.requests import RequestStatus

        state.status, state.error = RequestStatus.FAILED, str(error)
        self.deliver(state.to_generation_output())


class ContinuousBatcher(RowBatcher):
    def __init__(self, model, tokenizer, stop_ids, stop_strings, max_rows: int = 8,
                 kv_cache_tokens: int | None = None):
        super().__init__(tokenizer, stop_ids, stop_strings, max_rows)
        self.model, self.kv_cache_tokens = model, kv_cache_tokens
        self.sampling: dict[int, RowSampling] = {}  # what RowSampler reads, by row key
        self.manager = None
        self.start_lock = threading.Lock()

    def _cache_config(self):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        device = next(self.model.parameters()).device
        tokens = self.kv_cache_tokens
        if tokens is None and device.type == "cpu":
            tokens = self.max_rows * CPU_CACHE_TOKENS_PER_ROW
        page = 256 if device.type == "cuda" else 64
        return ContinuousBatchingConfig(
            page_size=page, num_blocks=None if tokens is None else math.ceil(tokens / page),
            max_batch_tokens=PREFILL_CHUNK, max_requests_per_batch=self.max_rows,
            use_cuda_graph=False, use_async_batching=False)

    def start(self) -> None:
        """Start (or restart, after a failure ended it) the manager's generation loop."""
        from transformers import GenerationConfig
        from transformers.generation.continuous_batching.model_runner import infer_max_single_request_tokens

        with self.start_lock:
            if self.manager is not None and self.manager.is_running():
                return
            # Its logger prints to the console through a handler of its own, at INFO for every start and stop:
            # that would land in the middle of a chat. Its warnings still show.
            cb_logger = logging.getLogger("ContinuousBatchingLogger")
            if cb_logger.level == logging.NOTSET:
                cb_logger.setLevel(logging.WARNING)
            if self.manager is not None:
                self.manager.stop(block=True, timeout=10)
            config = GenerationConfig(do_sample=False, eos_token_id=self.stop_ids,
                                      pad_token_id=self.tokenizer.pad_token_id)
            manager = self.model.init_continuous_batching(generation_config=config,
                                                          continuous_batching_config=self._cache_config())
            manager.logit_processor = sampler_processors(self.sampling)
            manager.output_router = _InlineRouter(self._deliver)
            manager.start()
            _stop_with_the_interpreter(manager)
            while manager.batch_processor is None and manager.is_running():
                threading.Event().wait(0.01)  # the loop builds its cache first
            if not manager.is_running():
                raise RuntimeError(f"continuous batching did not start: {manager.background_thread_status.fatal_error}")
            self.capacity = infer_max_single_request_tokens(manager.batch_processor.cache)
            self.manager = manager

    def submit(self, prompt: list[int], params: SamplingParams, listener: RowListener) -> RowHandle:
        if self.manager is None or not self.manager.is_running():
            self.start()
        row = self.new_row(prompt, params, listener)
        self.sampling[row.key] = row.sampling
        added = self.manager.add_request(row.prompt, request_id=_request_id(row.key),
                                         max_new_tokens=params.max_new_tokens, streaming=True,
                                         eos_token_id=self.stop_ids, row=row.key)
        if added is None:
            self.fail(row, RuntimeError("the generation loop refused the request (it is stopping)"))
        return RowHandle(self, row)

    def forget(self, row: Row) -> None:
        super().forget(row)
        self.sampling.pop(row.key, None)
        if self.manager is not None:
            self.manager.cancel_request(_request_id(row.key))  # a no-op for a request that has finished

    def _deliver(self, output) -> None:
        """One row's tokens so far (the generation thread, between two steps)."""
        row = self.rows.get(_row_key(output.request_id))
        if row is None:
            return  # cancelled since the step began
        try:
            if output.error is not None:
                self.fail(row, RuntimeError(f"generation failed: {output.error}"))
                return
            row.feed(output.generated_tokens[row.seen:])
            if not row.answer.done and output.is_finished():
                piece = row.answer.end("length")
                if piece:
                    row.listener.piece(piece)
            if row.answer.done:
                self.finish(row)  # cancels the request when a stop string, not the manager, ended it
        except Exception as err:  # noqa: BLE001 - one row's listener failing must not end the others' loop
            logger.exception("a generated row failed")
            self.fail(row, err)

    def close(self) -> None:
        with self.start_lock:
            if self.manager is not None and self.manager.is_running():
                self.manager.stop(block=True, timeout=10, hard_stop=True)
            self.manager = None
        for row in list(self.rows.values()):
            self.fail(row, RuntimeError("the generation engine was closed"))


def _request_id(key: int) -> str:
    return f"medgpt-{key}"


def _row_key(request_id: str) -> int:
    return int(request_id.rsplit("-", 1)[-1])


_RUNNING_MANAGERS: "weakref.WeakSet" = weakref.WeakSet()


def _stop_with_the_interpreter(manager) -> None:
    """The manager's loop is not a daemon thread, so exit would wait for it forever: stop it first.

    `atexit` runs only after the interpreter has joined its threads; `threading._register_atexit` (what
    `concurrent.futures` uses for its workers) runs before, in the main thread. A daemon watcher thread would
    not do: it could hold the last reference to the manager and free its tensors while the interpreter
    finalises, which aborts the process.
    """
    if not _RUNNING_MANAGERS:
        threading._register_atexit(_stop_running_managers)
    _RUNNING_MANAGERS.add(manager)


def _stop_running_managers() -> None:
    for manager in list(_RUNNING_MANAGERS):
        if manager.is_running():
            manager.stop(block=True, timeout=10, hard_stop=True)


# ------------------------------------------------------------------------------------------- serial


class _RowStreamer:
    """`generate`'s streamer for one row: the first call is the prompt, then one token per step."""

    def __init__(self, row: Row):
        self.row, self.prompt_seen = row, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if not self.row.answer.done:
            self.row.feed(value.view(-1).tolist())

    def end(self) -> None:
        return None


class _RowEnded:
    """Stop `generate` once the row's answer is over or the row was cancelled."""

    def __init__(self, row: Row):
        self.row = row

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.row.answer.done or self.row.ended, dtype=torch.bool,
                          device=input_ids.device)


class SerialBatcher(RowBatcher):
    """One row at a time through `generate` (a worker thread), for models continuous batching cannot run."""

    def __init__(self, model, tokenizer, stop_ids, stop_strings, max_rows: int = 8):
        super().__init__(tokenizer, stop_ids, stop_strings, max_rows)
        self.model = model
        self.waiting: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="medgpt-serial-generation", daemon=True)
        self.worker.start()

    def submit(self, prompt: list[int], params: SamplingParams, listener: RowListener) -> RowHandle:
        row = self.new_row(prompt, params, listener)
        self.waiting.put(row)
        return RowHandle(self, row)

    def _work(self) -> None:
        while True:
            row = self.waiting.get()
            if row is None:
                return
            if row.ended:
                continue
            try:
                self._generate(row)
            except Exception as err:  # noqa: BLE001 - reported to the row's submitter
                logger.exception("generation failed")
                self.fail(row, err)

    @torch.inference_mode()
    def _generate(self, row: Row) -> None:
        from transformers import StoppingCriteriaList

        device = next(self.model.parameters()).device
        ids = torch.tensor([row.prompt], device=device)
        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            temperature=None, top_p=None, top_k=None, max_new_tokens=row.answer.max_new_tokens,
                            eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                            logits_processor=[OneRowSampler(row.sampling)], streamer=_RowStreamer(row),
                            stopping_criteria=StoppingCriteriaList([_RowEnded(row)]))
        piece = row.answer.end("length")
        if piece:
            row.listener.piece(piece)
        self.finish(row)

    def close(self) -> None:
        self.waiting.put(None)
        for row in list(self.rows.values()):
            self.fail(row, RuntimeError("the generation engine was closed"))


def start_batcher(model, tokenizer, stop_ids, stop_strings, max_rows: int = 8, kv_cache_tokens: int | None = None,
                  continuous: bool = True) -> RowBatcher:
    """Continuous batching when the model runs under it (checked with a one-token probe), else one at a time."""
    if continuous:
        batcher = ContinuousBatcher(model, tokenizer, stop_ids, stop_strings, max_rows, kv_cache_tokens)
        try:
            batcher.start()
            _probe(batcher)
            return batcher
        except Exception as err:  # noqa: BLE001 - any failure means: not under continuous batching
            logger.warning("continuous batching cannot run this model (%s): generating one request at a time",
                           err)
            batcher.close()
    return SerialBatcher(model, tokenizer, stop_ids, stop_strings, max_rows)


class Waiter:
    """A listener that keeps a row's Completion (or its error) for a caller waiting on `event`."""

    def __init__(self):
        self.event, self.error, self.completion = threading.Event(), None, None

    def piece(self, text: str) -> None:
        return None

    def done(self, completion: Completion) -> None:
        self.completion = completion
        self.event.set()

    def failed(self, error: BaseException) -> None:
        self.error = error
        self.event.set()


def _probe(batcher: ContinuousBatcher, timeout: float = 300.0) -> None:
    waiter = Waiter()
    first = batcher.tokenizer.bos_token_id or batcher.tokenizer.eos_token_id or 0
    batcher.submit([first], SamplingParams(max_new_tokens=1, temperature=0), waiter)
    if not waiter.event.wait(timeout):
        raise RuntimeError(f"a one-token request did not finish in {timeout:.0f} s")
    if waiter.error is not None:
        raise waiter.error
