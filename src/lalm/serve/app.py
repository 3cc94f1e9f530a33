"""FastAPI routes: OpenAI's chat completions, transcriptions and models list, plus the web page.

Every request is read with a size cap, authenticated, validated (schemas.py), its audio
decoded under the media policy (media.py) and rendered by the backend, all before it
takes a place in the engine's queue; any failure there is a 4xx in OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from lalm.audio import SAMPLE_RATE
from lalm.errors import ContextLengthError, LalmError
from lalm.serve.engine import Delta, Engine, Failed, Finished, Options, QueueFull, ShuttingDown
from lalm.serve.media import MediaPolicy, build_conversation, decode_audio
from lalm.serve.schemas import APIError, ChatRequest, parse_chat_request

log = logging.getLogger("lalm.serve")
STATIC = Path(__file__).parent / "static"
ASR_PROMPT = "Transcribe this audio."


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None
    max_request_bytes: int = 25 * 1024 * 1024
    media: MediaPolicy = field(default_factory=MediaPolicy)
    default_max_tokens: int = 512  # when a request sets neither max_tokens nor its new name
    asr_prompt: str = ASR_PROMPT  # instruct checkpoints: the user turn's instruction
    asr_raw_prompt: str | None = None  # base checkpoints: a raw prompt with <|AUDIO|>
    shutdown_grace_s: float = 30.0
    prepare_workers: int = 2  # requests whose audio is decoded/featurized at the same time


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it passes `limit` bytes (a lying or absent Content-Length too)."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if too_big:
            # Drain a little so the client gets our 413 rather than a reset mid-upload.
            if size > 4 * limit:
                break
            continue
        chunks.append(chunk)
    if too_big:
        raise APIError(
            413,
            f"Request body is larger than this server's limit of {limit} bytes "
            "(--max-request-bytes)",
            code="request_too_large",
        )
    return b"".join(chunks)


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    backend = engine.backend
    model_name = backend.model_name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        # Rows still decoding get `shutdown_grace_s` to finish; waiting ones get a 503.
        await run_in_threadpool(engine.shutdown, config.shutdown_grace_s)

    app = FastAPI(title="lalm", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Audio decoding and feature extraction run in worker threads, a few at a time and in
    # arrival order: 32 requests prepared all at once would share the CPU and all reach the
    # engine late, instead of the first ones starting to decode while the rest prepare.
    preparing = asyncio.Semaphore(config.prepare_workers)
    app.state.engine = engine
    app.state.config = config

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(APIError(e.status_code, msg, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in first["loc"][1:]) or None
        return _error_response(APIError(400, f"{param}: {first['msg']}", param, "invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"internal server error ({type(e).__name__})"))

    def auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise APIError(
                401,
                "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'."
                if header
                else "Missing API key. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    def check_model(name: str | None, param: str = "model") -> None:
        if name and name != model_name:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {model_name!r}.",
                param,
                "model_not_found",
            )

    def prepare(conversation: list[dict] | dict):
        try:
            return backend.prepare(conversation)
        except ContextLengthError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        except LalmError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None

    def options_for(req: ChatRequest, prompt_tokens: int) -> Options:
        room = backend.max_context - prompt_tokens
        wanted = req.max_new_tokens()
        if room < 1 or (wanted is not None and wanted > room):
            raise APIError(
                400,
                f"This model's maximum context length is {backend.max_context} tokens; the "
                f"messages take {prompt_tokens} and {wanted or 1} more were requested.",
                "messages",
                "context_length_exceeded",
            )
        return Options(
            max_new_tokens=wanted or min(room, config.default_max_tokens),
            temperature=req.temperature,  # None: the checkpoint's generation_config
            top_p=req.top_p,
            seed=req.seed,
            stop=tuple(req.stop_list()),
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs or 0,
            top_k=None if req.top_k is None else max(req.top_k, 0),  # vLLM's -1 (off) is lalm's 0
            repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens or 0,
        )

    def submit_all(prepared, options: list[Options]):
        room = engine.max_batch + engine.max_queue
        if len(options) > room:  # a 429 would say "retry later" to a request that can never fit
            raise APIError(400, f"n: {len(options)} answers are more than this server ever holds at "
                           f"once (max_batch {engine.max_batch} + max_queue {engine.max_queue} = {room})",
                           "n", "invalid_value")
        handles = []
        try:
            for o in options:
                handles.append(engine.submit(prepared, o))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            raise APIError(429, str(e), code="queue_full") from None
        except ShuttingDown as e:
            for h in handles:
                h.cancel()
            raise APIError(503, str(e), code="shutting_down") from None
        return handles

    async def run_to_end(request: Request, handles) -> list[dict] | None:
        """Collect every choice; a client that hangs up cancels its rows (returns None)."""

        async def collect(h) -> dict:
            text, logprobs, end = [], [], None
            async for ev in h:
                if isinstance(ev, Delta):
                    text.append(ev.text)
                    logprobs += ev.logprobs
                else:
                    end = ev
            return {"text": "".join(text), "logprobs": logprobs, "end": end}

        task = asyncio.gather(*(collect(h) for h in handles))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    return None
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieve)
            for h in handles:
                h.cancel()

    # ---------------- routes ----------------
    @app.get("/health")
    async def health():
        running, waiting = engine.load
        body = {"status": "ok" if engine.alive else "engine stopped", "model": model_name,
                "running": running, "waiting": waiting}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        auth(request)
        check_model(name)
        return _model_card(model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        req = parse_chat_request(await _read_body(request, config.max_request_bytes))
        check_model(req.model)
        async with preparing:
            conversation = await run_in_threadpool(build_conversation, req, config.media)
            prepared = await run_in_threadpool(prepare, conversation)
        base = options_for(req, prepared.prompt_tokens)
        # n choices are n rows; with a seed, row i uses seed+i so sampled choices differ.
        opts = [
            base if base.seed is None or i == 0 else replace(base, seed=(base.seed + i) % 2**63)
            for i in range(req.n)
        ]
        handles = submit_all(prepared, opts)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(handles, rid, created, model_name, usage, prepared.prompt_tokens),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        results = await run_to_end(request, handles)
        if results is None:
            return Response(status_code=499)  # nobody is listening; the rows are freed
        choices, completion = [], 0
        for i, r in enumerate(results):
            if isinstance(r["end"], Failed):
                raise APIError(r["end"].status, r["end"].message)
            completion += r["end"].completion_tokens
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": r["text"]},
                "logprobs": {"content": r["logprobs"]} if req.logprobs else None,
                "finish_reason": r["end"].reason,
            })
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": _usage(prepared.prompt_tokens, completion),
        }

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        auth(request)
        body = await _read_body(request, config.max_request_bytes)
        form = await _parse_form(request, body)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "file: a multipart file field named 'file' is required", "file")
        check_model(_field(form, "model", required=True))
        fmt = _field(form, "response_format") or "json"
        if fmt not in ("json", "text"):
            raise APIError(
                400,
                f"response_format: {fmt!r} is not supported; use 'json' or 'text'",
                "response_format",
                "invalid_value",
            )
        language = _field(form, "language")
        if language and not re.fullmatch(r"[A-Za-z]{2,3}", language):
            raise APIError(400, f"language: {language!r} is not an ISO-639-1 code", "language")
        temperature = _float_field(form, "temperature", 0.0, 0.0, 2.0)
        if (_field(form, "stream") or "false").lower() != "false":
            # Answered with JSON, the SDK's stream=True reads it as an empty event stream.
            raise APIError(400, "stream: streamed transcriptions are not supported by this "
                           "server", "stream", "unsupported_parameter")
        # OpenAI's `prompt` steers a Whisper decoder's style; our ASR prompt is the one the
        # model was trained with, so `prompt` is accepted and not used.
        raw = await upload.read()
        async with preparing:
            wave = await run_in_threadpool(decode_audio, raw, "file", config.media)
        audio = {"array": wave, "sampling_rate": SAMPLE_RATE}
        if config.asr_raw_prompt:
            # A base checkpoint: its raw pre-training prompt, the language tag filled in.
            text = config.asr_raw_prompt.replace("{language}", (language or "en").lower())
            conversation = {"prompt": text, "audios": [audio]}
        else:
            conversation = [{"role": "user", "content": [
                {"type": "audio", "audio": audio},
                {"type": "text", "text": config.asr_prompt},
            ]}]
        async with preparing:
            prepared = await run_in_threadpool(prepare, conversation)
        room = backend.max_context - prepared.prompt_tokens
        if room < 1:
            raise APIError(400, "file: the audio fills the model's context", "file",
                           "context_length_exceeded")
        opts = Options(max_new_tokens=min(room, config.default_max_tokens),
                       temperature=temperature)
        results = await run_to_end(request, submit_all(prepared, [opts]))
        if results is None:
            return Response(status_code=499)
        end = results[0]["end"]
        if isinstance(end, Failed):
            raise APIError(end.status, end.message)
        text = results[0]["text"].strip()
        if fmt == "text":
            return PlainTextResponse(text)
        return {"text": text, "usage": {
            "type": "tokens",
            "input_tokens": prepared.prompt_tokens,
            "output_tokens": end.completion_tokens,
            "total_tokens": prepared.prompt_tokens + end.completion_tokens,
        }}

    # ---------------- the web page ----------------
    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _retrieve(fut: asyncio.Future) -> None:
    # A cancelled gather still holds an exception; read it so asyncio does not log it.
    if not fut.cancelled():
        fut.exception()


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lalm"}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _parse_form(request: Request, body: bytes):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "The body must be multipart/form-data with a 'file' field.",
                       code="invalid_content_type")
    sent = False

    async def replay() -> dict:
        # The body was already read (under the size cap); hand it to the form parser.
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form()
    except (StarletteHTTPException, MultiPartException, ValueError) as e:  # a malformed body
        raise APIError(400, f"Malformed multipart body: {e}", code="invalid_multipart") from None


def _field(form, name: str, required: bool = False) -> str | None:
    value = form.get(name)
    if value is None or value == "":
        if required:
            raise APIError(400, f"{name}: this field is required", name, "missing_field")
        return None
    if not isinstance(value, str):
        raise APIError(400, f"{name}: must be a text field, not a file", name, "invalid_value")
    return value


def _float_field(form, name: str, default: float, lo: float, hi: float) -> float:
    value = _field(form, name)
    if value is None:
        return default
    try:
        x = float(value)
    except ValueError:
        raise APIError(400, f"{name}: {value!r} is not a number", name, "invalid_value") from None
    if not lo <= x <= hi:
        raise APIError(400, f"{name}: must be between {lo} and {hi}", name, "invalid_value")
    return x


def _chunk(rid: str, created: int, model: str, choices: list, usage=None) -> str:
    obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(handles, rid, created, model, include_usage, prompt_tokens) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, content deltas, finish, [DONE]."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        async for ev in h:
            await merged.put((i, ev))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for i in range(len(handles)):
            yield _chunk(rid, created, model, [{"index": i, "delta": {"role": "assistant",
                         "content": ""}, "logprobs": None, "finish_reason": None}])
        left, completion = len(handles), 0
        while left:
            i, ev = await merged.get()
            if isinstance(ev, Delta):
                yield _chunk(rid, created, model, [{
                    "index": i, "delta": {"content": ev.text},
                    "logprobs": {"content": ev.logprobs} if ev.logprobs else None,
                    "finish_reason": None}])
            elif isinstance(ev, Finished):
                left -= 1
                completion += ev.completion_tokens
                yield _chunk(rid, created, model, [{"index": i, "delta": {}, "logprobs": None,
                                                    "finish_reason": ev.reason}])
            else:  # Failed: OpenAI's streams carry errors as an event with an error object
                left -= 1
                yield f"data: {json.dumps(APIError(ev.status, ev.message).body())}\n\n"
        if include_usage:
            yield _chunk(rid, created, model, [], _usage(prompt_tokens, completion))
        yield "data: [DONE]\n\n"
    finally:
        # Normal end, or the client hung up (the generator is closed/cancelled): free rows.
        for t in tasks:
            t.cancel()
        for h in handles:
            h.cancel()
