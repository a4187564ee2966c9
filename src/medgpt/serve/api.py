"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) on the generation engine.

`/v1/chat/completions` and `/v1/completions` (plain JSON, or server-sent events ending in `data: [DONE]`),
`/v1/models` and `/health`. Every error, ours or the framework's, is OpenAI's error JSON, so the official
clients raise their usual exceptions. Safety limits: a Bearer API key (required when listening beyond
loopback), a request size cap, a `max_tokens` cap, the model's context window, and a bounded queue that
answers 503 when full.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from medgpt.data.formats import RecordError, check_prompt, turns_to_messages
from medgpt.data.records import Message
from medgpt.serve import check_api_exposure, protocol
from medgpt.serve.engine import Completion, GenerationEngine, SamplingParams
from medgpt.serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from medgpt.serve.scheduler import GenerateJob, GenerationQueue, QueueFull, StreamJob

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 1_000_000  # a long conversation is ~100 KB; more is a mistake or an attack
    max_tokens_limit: int = 4096  # the most tokens one request may ask for
    default_max_tokens: int = 512  # when a chat request gives no max_tokens (completions: OpenAI's 16)
    max_pending: int = 64  # requests waiting or running; beyond that: 503
    max_batch: int = 8  # requests generated together
    max_n: int = 8


def request_messages(turns: list[dict]) -> list[Message]:
    """OpenAI request messages -> canonical messages, checked like a data file's prompt."""
    turns = [{**t, "role": "system"} if t.get("role") == "developer" else t for t in turns]
    try:
        messages = turns_to_messages(turns, "messages")
        check_prompt(messages, "messages")
    except RecordError as err:
        raise OpenAIError(400, str(err), param=err.field) from None
    return messages


class OpenAIServer:
    """The routes' logic, around one engine and its generation queue."""

    def __init__(self, engine: GenerationEngine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.queue = GenerationQueue(engine, settings.max_pending, settings.max_batch)
        self.context = getattr(engine.model.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if not self.settings.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), self.settings.api_key):
            raise OpenAIError(401, "missing or incorrect API key: send `Authorization: Bearer KEY`",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def parse(self, request: Request, model: type[BaseModel]):
        """The JSON body as `model`, refusing bodies over the size limit before reading them whole."""
        self.authorize(request)
        limit = self.settings.max_request_bytes
        too_big = OpenAIError(413, f"request body is over this server's limit of {limit} bytes",
                              code="request_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            parsed = model.model_validate_json(bytes(body))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise OpenAIError(400, f"{where or 'body'}: {first['msg']}", param=where) from None
        if parsed.model != self.settings.model_name:
            raise OpenAIError(404, f"model {parsed.model!r} is not served here (this server has "
                                   f"{self.settings.model_name!r})", param="model", code="model_not_found")
        if parsed.n > self.settings.max_n:
            raise OpenAIError(400, f"n is over this server's limit of {self.settings.max_n}", param="n")
        return parsed

    def sampling(self, body, prompt_tokens: int, default_max_tokens: int) -> SamplingParams:
        """The request's sampling options, with max_tokens checked against the limit and the context window."""
        requested = body.token_limit() if isinstance(body, ChatCompletionRequest) else body.max_tokens
        if requested and requested > self.settings.max_tokens_limit:
            raise OpenAIError(400, f"max_tokens {requested} is over this server's limit of "
                                   f"{self.settings.max_tokens_limit}", param="max_tokens")
        room = self.context - prompt_tokens if self.context else None
        if room is not None and (room < 1 or (requested or 0) > room):
            raise OpenAIError(400, f"the prompt has {prompt_tokens} tokens and {requested or 1} more were asked "
                                   f"for, but the model's context is {self.context} tokens",
                              param="messages", code="context_length_exceeded")
        tokens = requested or min(default_max_tokens, room or default_max_tokens)
        try:
            stop = body.stop_strings()
        except ValueError as err:
            raise OpenAIError(400, str(err), param="stop") from None
        defaults = SamplingParams()
        return SamplingParams(
            max_new_tokens=tokens,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=body.top_k or 0, repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=stop)

    def submit(self, job) -> None:
        try:
            self.queue.submit(job)
        except QueueFull as err:
            raise OpenAIError(503, f"the server is busy ({err}); retry shortly", type="server_error",
                              code="server_overloaded", headers={"Retry-After": "1"}) from None

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        job = GenerateJob(prompts, params)
        self.submit(job)
        return await asyncio.wrap_future(job.future)

    def stream(self, prompts: list[list[int]], params: SamplingParams) -> tuple[StreamJob, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        job = StreamJob(prompts, params, lambda event: loop.call_soon_threadsafe(inbox.put_nowait, event))
        self.submit(job)
        return job, inbox

    # ------------------------------------------------------------------------------------ routes

    async def chat_completions(self, request: Request):
        body: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        tools, messages = body.tool_definitions(), request_messages(body.messages)
        try:
            prompt = self.engine.chat_format.prompt_ids(messages, tools)
        except Exception as err:  # noqa: BLE001 - a template that refuses these messages
            raise OpenAIError(400, f"the chat template cannot render these messages: {err}", param="messages")
        params = self.sampling(body, len(prompt), self.settings.default_max_tokens)
        if body.stream:
            job, inbox = self.stream([prompt] * body.n, params)
            events = self.chat_events(inbox, body, len(prompt), tools is not None)
            return event_stream(events, job)
        completions = await self.generate([prompt] * body.n, params)
        return protocol.chat_completion(body.model, completions, len(prompt), tools is not None)

    async def completions(self, request: Request):
        body: CompletionRequest = await self.parse(request, CompletionRequest)
        try:
            texts = body.prompts()
        except ValueError as err:
            raise OpenAIError(400, str(err), param="prompt") from None
        prompts = [self.engine.text_prompt_ids(p) if isinstance(p, str) else p for p in texts]
        vocabulary = len(self.engine.tokenizer)
        if not all(prompts) or any(not 0 <= t < vocabulary for p in prompts for t in p):
            raise OpenAIError(400, f"each prompt needs at least one token, and token ids must be below {vocabulary}",
                              param="prompt")
        params = self.sampling(body, max(len(p) for p in prompts), 16)
        if body.stream and len(prompts) > 1:
            raise OpenAIError(400, "streaming takes one prompt", param="prompt")
        rows = [p for p in prompts for _ in range(body.n)]
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            job, inbox = self.stream(rows, params)
            return event_stream(self.completion_events(inbox, body, prompt_tokens), job)
        completions = await self.generate(rows, params)
        return protocol.text_completion(body.model, completions, prompt_tokens)

    # ------------------------------------------------------------------------------------ streams

    async def chat_events(self, inbox: asyncio.Queue, body: ChatCompletionRequest, prompt_tokens: int,
                          tools_offered: bool) -> AsyncIterator[str]:
        ident, created = protocol.new_id("chatcmpl"), int(time.time())

        def chunk(index, delta, finish=None):
            return protocol.sse(protocol.chat_chunk(ident, body.model, created, index, delta, finish))

        texts, sent, finished = [""] * body.n, [0] * body.n, []
        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for kind, index, value in events_of(inbox):
            if kind == "piece":
                texts[index] += value
                # with tools offered, a `<tool_call>` block is held back and sent as tool_calls at the end
                upto = protocol.safe_prefix_length(texts[index]) if tools_offered else len(texts[index])
                if upto > sent[index]:
                    yield chunk(index, {"content": texts[index][sent[index]:upto]})
                    sent[index] = upto
            else:  # done
                finished.append(value)
                _, calls = protocol.split_tool_calls(texts[index]) if tools_offered else (None, [])
                if calls:
                    yield chunk(index, {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]})
                elif sent[index] < len(texts[index]):
                    yield chunk(index, {"content": texts[index][sent[index]:]})
                yield chunk(index, {}, "tool_calls" if calls else value.finish_reason)
        if body.include_usage():
            yield protocol.sse(protocol.usage_chunk(ident, body.model, created, "chat.completion.chunk",
                                                    prompt_tokens, finished))
        yield protocol.sse("[DONE]")

    async def completion_events(self, inbox: asyncio.Queue, body: CompletionRequest,
                                prompt_tokens: int) -> AsyncIterator[str]:
        ident, created, finished = protocol.new_id("cmpl"), int(time.time()), []
        async for kind, index, value in events_of(inbox):
            if kind == "piece":
                yield protocol.sse(protocol.text_chunk(ident, body.model, created, index, value))
            else:
                finished.append(value)
                yield protocol.sse(protocol.text_chunk(ident, body.model, created, index, "", value.finish_reason))
        if body.include_usage():
            yield protocol.sse(protocol.usage_chunk(ident, body.model, created, "text_completion",
                                                    prompt_tokens, finished))
        yield protocol.sse("[DONE]")


async def events_of(inbox: asyncio.Queue) -> AsyncIterator[tuple]:
    """("piece" | "done", index, value) events of a stream job until it ends; a failure is raised."""
    while True:
        kind, index, value = await inbox.get()
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield kind, index, value


def event_stream(events: AsyncIterator[str], job: StreamJob) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as err:  # noqa: BLE001 - headers are sent: the error goes into the stream
            logger.exception("stream failed")
            yield protocol.sse(OpenAIError(500, f"generation failed: {err}", type="server_error").body())
        finally:
            job.cancelled.set()  # the client hung up or the stream ended: stop generating

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------------------- app


def create_app(engine: GenerationEngine, settings: ServerSettings) -> FastAPI:
    server = OpenAIServer(engine, settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.queue.stop()

    app = FastAPI(title="medgpt", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(OpenAIError)
    async def openai_error(request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return JSONResponse(OpenAIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, err: Exception):
        logger.exception("request failed")
        return JSONResponse(OpenAIError(500, f"internal error: {err}", type="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "pending": server.queue.pending}

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "medgpt"}]}

    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/completions")(server.completions)
    return app


def run_server(engine: GenerationEngine, settings: ServerSettings, host: str, port: int) -> None:
    import uvicorn

    check_api_exposure(host, settings.api_key)
    logger.info("serving %s on http://%s:%d/v1 (API key %s)", settings.model_name, host, port,
                "required" if settings.api_key else "not required: loopback only")
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)

