"""The server's requests on the engine's running batch: admission, one row per answer, cancellation.

A request becomes one row per prompt and choice (`n`) in the engine's continuous batch
(`GenerationEngine.submit`), where rows with any options share the steps: a stream that arrives while others
are generating joins them at the next step instead of waiting its turn. The queue is bounded: past
`max_pending` requests (waiting or running) `submit` refuses at once, so an overloaded server answers "busy"
instead of letting requests pile up until clients time out. `Job.cancel` (the client went away) drops a
request's rows at the next step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future
from typing import Callable

from medgpt.serve.engine import Completion, GenerationEngine, SamplingParams

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


class Job:
    """One request's rows; subclasses say where each row's pieces and completion go."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams):
        self.prompts, self.params = prompts, params
        self.handles: list = []
        self.remaining = len(prompts)
        self.closed = False  # every row over, or the job cancelled or failed
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.on_close: Callable[["Job"], None] | None = None

    def row_params(self, index: int) -> SamplingParams:
        # n > 1 with a seed: each choice its own seed, or all n would be the same sample
        if self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=self.params.seed + index)

    def start(self, engine: GenerationEngine) -> None:
        for index, prompt in enumerate(self.prompts):
            handle = engine.submit(prompt, self.row_params(index), _JobRow(self, index))
            with self.lock:
                self.handles.append(handle)
                stopped = self.closed
            if stopped:  # cancelled or failed while its rows were being submitted
                handle.cancel()
                return

    def cancel(self) -> None:
        """Drop every row still generating; nothing more is reported."""
        self.cancelled.set()
        if self._close():
            for handle in list(self.handles):
                handle.cancel()

    def _close(self) -> bool:
        with self.lock:
            if self.closed:
                return False
            self.closed = True
        if self.on_close is not None:
            self.on_close(self)
        return True

    def _row_done(self, index: int, completion: Completion) -> None:
        with self.lock:
            if self.closed:
                return
            self.remaining -= 1
            last = self.remaining == 0
        self.row_done(index, completion)
        if last and self._close():
            self.all_done()

    def _row_failed(self, error: BaseException) -> None:
        if self._close():
            for handle in list(self.handles):
                handle.cancel()
            self.failed(error)

    # what subclasses report
    def row_piece(self, index: int, text: str) -> None: ...

    def row_done(self, index: int, completion: Completion) -> None: ...

    def all_done(self) -> None: ...

    def failed(self, error: BaseException) -> None: ...


class _JobRow:
    """The engine's listener for one row of a job."""

    def __init__(self, job: Job, index: int):
        self.job, self.index = job, index

    def piece(self, text: str) -> None:
        if not self.job.closed:
            self.job.row_piece(self.index, text)

    def done(self, completion: Completion) -> None:
        self.job._row_done(self.index, completion)

    def failed(self, error: BaseException) -> None:
        self.job._row_failed(error)


class GenerateJob(Job):
    """All answers at once: `future` gets the completions in prompt order."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams):
        super().__init__(prompts, params)
        self.future: Future = Future()
        self.completions: list[Completion | None] = [None] * len(prompts)

    def row_done(self, index: int, completion: Completion) -> None:
        self.completions[index] = completion

    def all_done(self) -> None:
        self.future.set_result(self.completions)

    def failed(self, error: BaseException) -> None:
        self.future.set_exception(error)

    def cancel(self) -> None:
        super().cancel()
        self.future.cancel()


class StreamJob(Job):
    """Answers as they come: `emit` gets ("piece", index, text), ("done", index, Completion) and at the end
    ("end", None, None) or ("error", None, exception)."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams, emit: Callable[[tuple], None]):
        super().__init__(prompts, params)
        self.emit = emit

    def row_piece(self, index: int, text: str) -> None:
        self.emit(("piece", index, text))

    def row_done(self, index: int, completion: Completion) -> None:
        self.emit(("done", index, completion))

    def all_done(self) -> None:
        self.emit(("end", None, None))

    def failed(self, error: BaseException) -> None:
        logger.error("streaming generation failed: %s", error)
        self.emit(("error", None, error))


class GenerationQueue:
    def __init__(self, engine: GenerationEngine, max_pending: int = 64, max_batch: int = 8,
                 kv_cache_tokens: int | None = None):
        self.engine, self.max_pending = engine, max_pending
        self.batcher = engine.start_batching(max_batch, kv_cache_tokens)  # the engine's, if already running
        self.jobs: set[Job] = set()
        self.condition = threading.Condition()
        self.stopped = False

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return len(self.jobs)

    @property
    def capacity(self) -> int | None:
        """Most tokens (prompt + answer) one row may hold in the KV cache; None: only the model's context."""
        return self.batcher.capacity

    def submit(self, job: Job) -> None:
        with self.condition:
            if self.stopped:
                raise QueueFull("the server is shutting down")
            if self.pending >= self.max_pending:
                raise QueueFull(f"{self.pending} requests are already waiting or running (limit {self.max_pending})")
            self.jobs.add(job)
        job.on_close = self._closed
        try:
            job.start(self.engine)
        except BaseException:
            job.cancel()
            raise

    def _closed(self, job: Job) -> None:
        with self.condition:
            self.jobs.discard(job)
            self.condition.notify_all()

    def stop(self) -> None:
        """Refuse new requests and drop the running ones (the engine's batch keeps running for its other users)."""
        with self.condition:
            self.stopped = True
            jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
