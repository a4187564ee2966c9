"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) on the generation engine.

`/v1/chat/completions` and `/v1/completions` (plain JSON, or server-sent events ending in `data: [DONE]`),
`/v1/models` and `/health`. Every error, ours or the framework's, is OpenAI's error JSON, so the official
clients raise their usual exceptions. Requests join the engine's running batch (continuous batching), streaming
or not, and a client that hangs up has its rows dropped at the next step. Safety limits: a Bearer API key
(required when listening beyond loopback), a request size cap, a `max_tokens` cap, prompts per request and a
generation budget per request, the model's context window and the KV cache, and a bounded queue that answers
503 when full. Tokenising and rendering run in a worker thread, off the event loop.
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
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from medgpt.data.formats import RecordError, check_conversation, turns_to_messages
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
    max_batch: int = 8  # rows (answers) generated together in the running batch
    max_n: int = 8
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_request_tokens: int = 65536  # generation budget of one request: prompts x n x max_tokens
    kv_cache_tokens: int | None = None  # KV cache of the running batch; None: the engine's default
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    # For an omitted `temperature` / `top_p`: OpenAI's defaults, so clients get what they would elsewhere.
    default_temperature: float = 1.0
    default_top_p: float = 1.0


def request_messages(turns: list[dict]) -> tuple[list[Message], str | None]:
    """OpenAI request messages -> canonical messages, checked like a data file's prompt, and the start of the
    assistant's reply when the conversation ends with one (prefill: the answer continues it)."""
    turns = [{**t, "role": "system"} if t.get("role") == "developer" else t for t in turns]
    try:
        messages = turns_to_messages(turns, "messages")
        check_conversation(messages, "messages", needs_reply=False)
        if messages[-1].role == "assistant" and messages[-1].tool_calls:
            raise RecordError("messages", "a conversation may end with an assistant message to continue "
                                          "(prefill), but not with its tool calls: send their results")
        if messages[-1].role not in ("user", "tool", "assistant"):
            raise RecordError("messages", f"a prompt must end with a user or tool turn, not {messages[-1].role}")
    except RecordError as err:
        raise OpenAIError(400, str(err), param=err.field) from None
    if messages[-1].role == "assistant":
        return messages[:-1], messages[-1].content
    return messages, None


async def client_gone(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIServer:
    """The routes' logic, around one engine and its generation queue."""

    def __init__(self, engine: GenerationEngine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.queue = GenerationQueue(engine, settings.max_pending, settings.max_batch, settings.kv_cache_tokens)
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

    def sampling(self, body, prompt_tokens: int, default_max_tokens: int, rows: int) -> SamplingParams:
        """The request's sampling options, with max_tokens checked against the limits, the context window and
        the KV cache; `rows` answers (prompts x n) must fit the generation budget."""
        requested = body.token_limit() if isinstance(body, ChatCompletionRequest) else body.max_tokens
        if requested and requested > self.settings.max_tokens_limit:
            raise OpenAIError(400, f"max_tokens {requested} is over this server's limit of "
                                   f"{self.settings.max_tokens_limit}", param="max_tokens")
        window, what = self.context, "the model's context"
        if self.queue.capacity is not None and (window is None or self.queue.capacity < window):
            window, what = self.queue.capacity, "the server's KV cache (--kv-cache-tokens)"
        room = window - prompt_tokens if window else None
        if room is not None and (room < 1 or (requested or 0) > room):
            raise OpenAIError(400, f"the prompt has {prompt_tokens} tokens and {requested or 1} more were asked "
                                   f"for, but {what} is {window} tokens",
                              param="messages", code="context_length_exceeded")
        tokens = requested or min(default_max_tokens, room or default_max_tokens)
        budget = self.settings.max_request_tokens
        if rows * tokens > budget:
            raise OpenAIError(400, f"{rows} answers (prompts x n) x {tokens} max_tokens is over this server's "
                                   f"generation budget of {budget} tokens per request (--max-request-tokens): "
                                   "ask for fewer or shorter answers, or split the request", param="max_tokens")
        try:
            stop = body.stop_strings()
        except ValueError as err:
            raise OpenAIError(400, str(err), param="stop") from None
        settings = self.settings
        return SamplingParams(
            max_new_tokens=tokens,
            temperature=settings.default_temperature if body.temperature is None else body.temperature,
            top_p=settings.default_top_p if body.top_p is None else body.top_p,
            top_k=body.top_k or 0, repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=stop)

    def submit(self, job) -> None:
        try:
            self.queue.submit(job)
        except QueueFull as err:
            raise OpenAIError(503, f"the server is busy ({err}); retry shortly", type="server_error",
                              code="server_overloaded", headers={"Retry-After": "1"}) from None

    async def generate(self, request: Request, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """The completions, unless the client hangs up first: then its rows are dropped at the next step."""
        job = GenerateJob(prompts, params)
        self.submit(job)
        answers = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({answers, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled (the server is stopping)
            gone.cancel()
            if not answers.done():
                job.cancel()
        if answers.cancelled():
            raise OpenAIError(499, "the client closed the connection", code="client_closed_request")
        return answers.result()

    def stream(self, prompts: list[list[int]], params: SamplingParams) -> tuple[StreamJob, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        job = StreamJob(prompts, params, lambda event: loop.call_soon_threadsafe(inbox.put_nowait, event))
        self.submit(job)
        return job, inbox

    def chat_prompt(self, messages: list[Message], tools: list[dict] | None, prefill: str | None) -> list[int]:
        """Token ids of the rendered conversation (and the prefilled start of the reply). Runs in a thread."""
        try:
            prompt = self.engine.chat_format.prompt_ids(messages, tools)
        except Exception as err:  # noqa: BLE001 - a template that refuses these messages
            raise OpenAIError(400, f"the chat template cannot render these messages: {err}", param="messages")
        if prefill:
            prompt = prompt + self.engine.tokenizer.encode(prefill, add_special_tokens=False)
        return prompt

    # ------------------------------------------------------------------------------------ routes

    async def chat_completions(self, request: Request):
        body: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        tools = body.tool_definitions()
        messages, prefill = request_messages(body.messages)
        prompt = await run_in_threadpool(self.chat_prompt, messages, tools, prefill)
        params = self.sampling(body, len(prompt), self.settings.default_max_tokens, body.n)
        if body.stream:
            job, inbox = self.stream([prompt] * body.n, params)
            events = self.chat_events(inbox, body, len(prompt), tools is not None)
            return event_stream(events, job)
        completions = await self.generate(request, [prompt] * body.n, params)
        return protocol.chat_completion(body.model, completions, len(prompt), tools is not None, prefill is not None)

    async def completions(self, request: Request):
        body: CompletionRequest = await self.parse(request, CompletionRequest)
        try:
            texts = body.prompts()
        except ValueError as err:
            raise OpenAIError(400, str(err), param="prompt") from None
        if len(texts) > self.settings.max_prompts:
            raise OpenAIError(400, f"{len(texts)} prompts in one request; this server takes at most "
                                   f"{self.settings.max_prompts} (--max-prompts): split the request", param="prompt")
        if body.stream and len(texts) > 1:
            raise OpenAIError(400, "streaming takes one prompt", param="prompt")
        prompts = await run_in_threadpool(
            lambda: [self.engine.text_prompt_ids(p) if isinstance(p, str) else p for p in texts])
        vocabulary = len(self.engine.tokenizer)
        if not all(prompts) or any(not 0 <= t < vocabulary for p in prompts for t in p):
            raise OpenAIError(400, f"each prompt needs at least one token, and token ids must be below {vocabulary}",
                              param="prompt")
        rows = [p for p in prompts for _ in range(body.n)]
        params = self.sampling(body, max(len(p) for p in prompts), 16, len(rows))
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            job, inbox = self.stream(rows, params)
            return event_stream(self.completion_events(inbox, body, prompt_tokens), job)
        completions = await self.generate(request, rows, params)
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
            job.cancel()  # the client hung up or the stream ended: drop what is still generating

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
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

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
        return {"status": "ok", "model": settings.model_name, "pending": server.queue.pending,
                "generating": server.queue.batcher.active}

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        # `medgpt` says what an omitted option means here and the request limits (an extension: clients ignore it)
        defaults = {"temperature": settings.default_temperature, "top_p": settings.default_top_p,
                    "max_tokens": {"chat": settings.default_max_tokens, "completions": 16}}
        limits = {"max_tokens": settings.max_tokens_limit, "n": settings.max_n, "prompts": settings.max_prompts,
                  "request_tokens": settings.max_request_tokens, "context": server.context,
                  "kv_cache_tokens": server.queue.capacity}
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "medgpt",
                                            "medgpt": {"defaults": defaults, "limits": limits}}]}

    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/completions")(server.completions)
    return app


def run_server(engine: GenerationEngine, settings: ServerSettings, host: str, port: int) -> None:
    import uvicorn

    check_api_exposure(host, settings.api_key)
    logger.info("serving %s on http://%s:%d/v1 (API key %s)", settings.model_name, host, port,
                "required" if settings.api_key else "not required: loopback only")
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)

