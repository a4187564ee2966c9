"""One worker thread runs every generation of the server, batching waiting requests that can share a batch.

The queue is bounded: past `max_pending` requests (waiting or running) `submit` refuses at once, so an
overloaded server answers "busy" instead of letting requests pile up until clients time out. Requests with
identical sampling options and no seed go through `generate` together (left-padded, so each answer is what it
would be alone); a seeded request runs alone to stay reproducible; streams run one at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from medgpt.serve.engine import Completion, GenerationEngine, SamplingParams

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass
class GenerateJob:
    prompts: list[list[int]]
    params: SamplingParams
    future: Future = field(default_factory=Future)

    def joins(self, other: "GenerateJob") -> bool:
        return self.params.seed is None and other.params == self.params


@dataclass
class StreamJob:
    """Streams each prompt in turn; `emit` gets ("piece", index, text), ("done", index, Completion) and at the
    end ("end", None, None) or ("error", None, exception). Setting `cancelled` stops generation early."""

    prompts: list[list[int]]
    params: SamplingParams
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationQueue:
    def __init__(self, engine: GenerationEngine, max_pending: int = 64, max_batch: int = 8):
        self.engine, self.max_pending, self.max_batch = engine, max_pending, max_batch
        self.jobs: deque = deque()
        self.pending = 0  # jobs waiting or running
        self.condition = threading.Condition()
        self.stopped = False
        self.worker = threading.Thread(target=self._work, name="medgpt-generation", daemon=True)
        self.worker.start()

    def submit(self, job: GenerateJob | StreamJob) -> None:
        with self.condition:
            if self.stopped:
                raise QueueFull("the server is shutting down")
            if self.pending >= self.max_pending:
                raise QueueFull(f"{self.pending} requests are already waiting or running (limit {self.max_pending})")
            self.pending += 1
            self.jobs.append(job)
            self.condition.notify()

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.worker.join(timeout=30)

    # ---------------------------------------------------------------------------------------- worker

    def _work(self) -> None:
        while True:
            with self.condition:
                while not self.jobs and not self.stopped:
                    self.condition.wait()
                if self.stopped:
                    return
                batch = self._take_batch()
            try:
                if isinstance(batch[0], StreamJob):
                    self._stream(batch[0])
                else:
                    self._generate(batch)
            finally:
                with self.condition:
                    self.pending -= len(batch)

    def _take_batch(self) -> list:
        first = self.jobs.popleft()
        batch = [first]
        if isinstance(first, GenerateJob):
            rows = len(first.prompts)
            for other in list(self.jobs):
                if rows + len(other.prompts) > self.max_batch:
                    break
                if isinstance(other, GenerateJob) and first.joins(other):
                    self.jobs.remove(other)
                    batch.append(other)
                    rows += len(other.prompts)
        return batch

    def _generate(self, batch: list[GenerateJob]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        try:
            completions = self.engine.generate_ids(prompts, batch[0].params, batch_size=self.max_batch)
        except Exception as err:  # noqa: BLE001 - every waiting request learns of it
            logger.exception("generation failed")
            for job in batch:
                job.future.set_exception(err)
            return
        for job in batch:
            job.future.set_result(completions[: len(job.prompts)])
            completions = completions[len(job.prompts):]

    def _stream(self, job: StreamJob) -> None:
        try:
            for index, prompt in enumerate(job.prompts):
                # n > 1 with a seed: each choice its own seed, or all n would be the same sample
                params = job.params
                if params.seed is not None:
                    params = dataclasses.replace(params, seed=params.seed + index)
                finished: list[Completion] = []
                pieces = self.engine.stream_ids(prompt, params, finished.append)
                try:
                    for piece in pieces:
                        if job.cancelled.is_set():
                            return
                        job.emit(("piece", index, piece))
                finally:
                    pieces.close()  # stops generation when the client went away
                job.emit(("done", index, finished[0]))
            job.emit(("end", None, None))
        except Exception as err:  # noqa: BLE001 - reported to the client's stream
            logger.exception("streaming generation failed")
            job.emit(("error", None, err))
