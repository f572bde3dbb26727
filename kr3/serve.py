"""kr3 over HTTP: an ASGI app (FastAPI) around one `kr3.Model` — OpenAI's completions API (`POST /v1/completions`,
whole or streamed as server-sent events; `GET /v1/models`), the next-token probabilities (`POST /v1/next_tokens`)
and a page at `/` (kr3/static: plain HTML, CSS and JS). stage=serve runs it under uvicorn.

Requests are queued, not batched: one thread makes every model call, one token of one completion at a time, in the
order they are asked for. Concurrent streams so take turns token by token (each with its own KV cache and seed, so
a seeded completion is the same however many others run), the event loop only waits, and a client that leaves
stops its completion at the next token."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from kr3.api import Model, decoding_options
from kr3.config import as_list, default_block
from kr3.errors import UserError
from kr3.sampling import END_OF_REVIEW, rating_control
from kr3.settings import OutOfRange

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_STOPS, MAX_STOP_CHARS = 4, 100  # OpenAI's 4 stop strings; short, since each is checked at every token
# OpenAI parameters kr3 does not do: accepted at the values that mean "off" (clients send them), refused otherwise
UNSUPPORTED = {"echo": (None, False), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
               "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, so that no client takes the server down: the `serve:` block's keys of these
    names (conf/config.yaml says what each bounds)."""

    max_body_bytes: int
    max_tokens: int
    max_n: int
    max_prompts: int
    max_next_tokens: int
    max_active: int

    @classmethod
    def of(cls, serve_cfg, **changes: int) -> Limits:
        """From the `serve:` settings (or conf/config.yaml's block as a dict), with `changes`."""
        get = serve_cfg.get if isinstance(serve_cfg, Mapping) else lambda key: getattr(serve_cfg, key)
        return cls(**{**{f.name: int(get(f.name)) for f in fields(cls)}, **changes})

    @classmethod
    def defaults(cls, **changes: int) -> Limits:
        """conf/config.yaml's, with `changes`."""
        return cls.of(default_block("serve"), **changes)


def api_key(s) -> str | None:
    """serve.api_key, else the KR3_API_KEY environment variable — read here, not interpolated into the config, where
    a stage that saves its resolved config (a checkpoint, W&B) would write it down."""
    key = os.environ.get("KR3_API_KEY") if s.api_key is None else str(s.api_key)
    if key is not None and not key.strip():
        raise UserError("the API key is empty (serve.api_key or KR3_API_KEY) — give a key, or unset it to serve without one")
    return key


def redact(folder: Path, key: str) -> None:
    """A key given as serve.api_key=… is in Hydra's copy of the command (overrides.yaml, config.yaml): blank it
    there, so the run folder never holds it. KR3_API_KEY is not copied at all."""
    for path in folder.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        if key in text:
            path.write_text(text.replace(key, "<redacted>"), encoding="utf-8")


class ApiError(HTTPException):
    """A request refused: its HTTP status and OpenAI's error object {message, type, param, code}. An HTTPException, so
    FastAPI passes it on as it is from wherever it is raised (reading the body too)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(status, message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


def rating_name_or_number(value):
    """`rating` as JSON gives it: a name or a number; not true/false, which pydantic would take for 1/0."""
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError('must be a rating\'s name or number, e.g. "positive" or 1')


Rating = Annotated[str | int | None, BeforeValidator(rating_name_or_number)]


class CompletionRequest(BaseModel):
    """OpenAI's completion request; `top_k`, `repetition_penalty`, `rating` and `guidance` are kr3's own. Unset sampling values
    take the server's defaults (stage=serve's `generate.*`); an unset seed is a random one."""

    # OpenAI's other parameters: see UNSUPPORTED; strict: "5" is no number (OpenAI refuses it too)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)
    model: str | None = None
    prompt: str | list[str] = ""
    # the decoding options' ranges are kr3.settings.Decoding's, checked once there (and refused as OutOfRange)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    rating: Rating = None
    guidance: float | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def text_prompts(cls, value):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, str) for p in value)):
            return value
        raise ValueError("must be a string or a list of strings (prompts of token ids are not supported)")

    @field_validator("stop", mode="before")
    @classmethod
    def few_short_stops(cls, value):
        stops = as_list(value)
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"must be a string or a list of strings of 1 to {MAX_STOP_CHARS} characters")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"has {len(stops)} strings; at most {MAX_STOPS} are allowed")
        return value


class NextTokensRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, strict=True)
    model: str | None = None
    prompt: str = ""
    k: int = Field(10, ge=1)
    rating: Rating = None
    guidance: float | None = None  # its range: kr3.settings.Decoding's


class ModelThread:
    """The one thread that runs the model, and the count of requests using it (bounded by `max_active`)."""

    def __init__(self, max_active: int):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kr3-model")
        self.max_active, self.active = max_active, 0

    async def call(self, fn: Callable, *args):
        """fn(*args) on the model thread, after every call asked for before it."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def admit(self) -> None:
        """A place for one more request (`release` gives it back), or 429 when `max_active` are in progress."""
        if self.active >= self.max_active:
            raise ApiError(429, f"the server is busy: {self.max_active} requests are in progress (serve.max_active) — "
                                "retry in a moment", kind="server_busy", code="server_busy")
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    async def iterate(self, generator: Iterator, gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator:
        """The items of a synchronous generator, each made on the model thread; closed however it ends. Ends with
        Disconnected once `gone()` says the client has left; a stream needs no `gone`: Starlette cancels it then
        (and asking would take the disconnect message it waits for)."""
        try:
            while not (gone and await gone()):
                item = await self.call(next, generator, None)
                if item is None:
                    return
                yield item
            raise Disconnected
        finally:
            self.pool.submit(generator.close)  # queued behind a step still running: a running generator cannot close

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Disconnected(Exception):
    """The client closed the connection: its completion stops."""


class EventStream(StreamingResponse):
    """Server-sent events that give back their request's place when the response ends, however it ends."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


@dataclass
class Completion:
    """One /v1/completions request, checked: its prompts, decoding options and what its responses carry."""

    prompts: list[str]
    n: int
    options: dict  # kr3 decoding options, rating included
    model: str
    id: str
    created: int

    def choices(self) -> Iterator[tuple[int, str, int]]:
        """(index, prompt, sample): OpenAI numbers the n choices of each prompt in turn."""
        for p, prompt in enumerate(self.prompts):
            for sample in range(self.n):
                yield p * self.n + sample, prompt, sample

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        return {**body, "usage": usage} if usage is not None else body


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def finish_reason(stats: dict, options: dict) -> str:
    """"length" when the completion used all its tokens, else "stop" (the end of the review or a stop string)."""
    return "length" if stats["tokens"] >= options["max_new_tokens"] else "stop"


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def check_rating(m: Model, rating: str | int | None) -> str | int | None:
    """`rating` as given, once kr3's own check (sampling.rating_control) accepts it for this checkpoint."""
    try:
        rating_control(rating, m.checkpoint.data.get("condition"))
    except UserError as e:
        raise ApiError(400, str(e), "rating") from None
    return rating


def check_completion(req: CompletionRequest, m: Model, limits: Limits, name: str) -> Completion:
    """The request as a Completion, or the ApiError that says what is wrong with it."""
    for key, value in (req.model_extra or {}).items():
        if key in UNSUPPORTED and value not in UNSUPPORTED[key]:
            raise ApiError(400, f"{key}={json.dumps(value)} is not supported by kr3 — leave it out", key)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    n = req.n or 1
    bounds = (("prompt", len(prompts), limits.max_prompts, "max_prompts"), ("n", n, limits.max_n, "max_n"),
              ("max_tokens", req.max_tokens or 0, limits.max_tokens, "max_tokens"))
    for param, value, bound, key in bounds:
        if value > bound:
            raise ApiError(400, f"{param}: {value} is above this server's limit of {bound} (serve.{key})", param)
    if not prompts:
        raise ApiError(400, "prompt: the list is empty — give a string or a list of strings", "prompt")
    return Completion(prompts, n, request_options(req, m, limits), name, f"cmpl-{uuid.uuid4().hex}", int(time.time()))


def request_options(req: CompletionRequest, m: Model, limits: Limits) -> dict:
    """The request's sampling parameters as kr3 decoding options over the server's defaults, checked."""
    given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
             "repetition_penalty": req.repetition_penalty, "stop": req.stop, "rating": check_rating(m, req.rating),
             "guidance": req.guidance}
    default_tokens = min(m.defaults["max_new_tokens"], limits.max_tokens)
    options = {"max_new_tokens": default_tokens if req.max_tokens is None else req.max_tokens,
               "seed": secrets.randbelow(2**31) if req.seed is None else req.seed, "num_samples": 1,
               **{k: v for k, v in given.items() if v is not None}}
    return decoding_options(options, m.defaults)  # a UserError left: 400 (user_error)


class Usage:
    """A response's token counts from its completions' stats: each prompt's tokens once (not once per sample),
    as the model was given them."""

    def __init__(self):
        self.prompt = self.completion = 0

    def add(self, stats: dict, sample: int) -> None:
        self.prompt += stats["prompt_tokens"] if sample == 0 else 0
        self.completion += stats["tokens"]

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


class Server:
    """The app's handlers over one Model, its limits and its model thread."""

    def __init__(self, m: Model, limits: Limits, name: str):
        self.m, self.limits, self.name = m, limits, name
        self.thread = ModelThread(limits.max_active)

    async def complete(self, request: Request, job: Completion) -> dict:
        """A whole completion response; stops when the client leaves (its error response is never read)."""
        self.thread.admit()
        choices, usage = [], Usage()
        try:
            for index, prompt, sample in job.choices():
                generation = self.m.stream_with_stats(prompt, sample, **job.options)  # a generator: runs on the model thread
                *_, stats = [item async for item in self.thread.iterate(generation, request.is_disconnected)]
                choices.append(choice(index, stats["completion"], finish_reason(stats, job.options)))
                usage.add(stats, sample)
        except Disconnected:
            raise ApiError(400, "the client closed the connection") from None
        finally:
            self.thread.release()
        return job.chunk(choices, usage.body())

    def stream(self, job: Completion, include_usage: bool) -> EventStream:
        self.thread.admit()
        return EventStream(self.events(job, include_usage), self.thread.release)

    async def events(self, job: Completion, include_usage: bool) -> AsyncIterator[str]:
        """The completion as server-sent events: its pieces of text as they come, each choice's finish_reason in a
        last event of its own, the usage (when asked for) and `data: [DONE]`."""
        usage = Usage()
        try:
            for index, prompt, sample in job.choices():
                async for item in self.thread.iterate(self.m.stream_with_stats(prompt, sample, **job.options)):
                    if isinstance(item, str):
                        yield sse(job.chunk([choice(index, item, None)]))
                    else:
                        usage.add(item, sample)
                        yield sse(job.chunk([choice(index, "", finish_reason(item, job.options))]))
        except Disconnected:
            return
        except Exception as e:  # the response has begun: the error goes into the stream, the traceback to the log
            log.exception("a streamed completion failed")
            yield sse(failure(e).body())
            return
        if include_usage:
            yield sse(job.chunk([], usage.body()))
        yield sse("[DONE]")

    async def next_tokens(self, req: NextTokensRequest) -> dict:
        if req.k > self.limits.max_next_tokens:
            raise ApiError(400, f"k: {req.k} is above this server's limit of {self.limits.max_next_tokens} "
                                "(serve.max_next_tokens)", "k")
        rating = check_rating(self.m, req.rating)
        self.thread.admit()
        try:
            top = await self.thread.call(self.m.next_tokens, req.prompt, req.k, rating, req.guidance)
        finally:
            self.thread.release()
        tokens = [{"text": text, "probability": p, "end_of_review": text == END_OF_REVIEW} for text, p in top]
        return {"object": "next_tokens", "model": self.name, "prompt": self.m.cleaned(req.prompt), "tokens": tokens}

    def card(self) -> dict:
        """This model as /v1/models lists it; `kr3` holds what the page needs."""
        d = self.m.defaults
        return {"id": self.name, "object": "model", "created": int(self.m.path.stat().st_mtime), "owned_by": "kr3",
                "kr3": {"ratings": self.m.ratings, "context_length": self.m.model.cfg.block_size,
                        "step": self.m.checkpoint.step, "limits": asdict(self.limits), "base_model": base_model(self.m),
                        "defaults": {"max_tokens": min(d["max_new_tokens"], self.limits.max_tokens),
                                     "temperature": d["temperature"], "top_p": d["top_p"], "guidance": d["guidance"]}}}


def base_model(m: Model) -> dict | None:
    """The pretrained model `m` was fine-tuned from, as the API shows it (not the folder it was read from)."""
    return {k: m.base[k] for k in ("name_or_path", "sha256", "license")} if m.base else None


def app(m: Model, limits: Limits | None = None, api_key: str | None = None, name: str = "kr3") -> FastAPI:
    """The ASGI app serving `m`: `/v1/*` (behind `Authorization: Bearer <api_key>` when a key is given), `/health`,
    and the page at `/`."""
    server = Server(m, limits or Limits.defaults(), name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.thread.close()

    async def health() -> dict:
        return {"status": "ok", "active": server.thread.active}

    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    fastapi = FastAPI(title="kr3", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    fastapi.include_router(v1_routes(server, api_key))
    fastapi.add_api_route("/health", health, methods=["GET"])
    fastapi.add_api_route("/", page, methods=["GET"])
    fastapi.mount("/static", StaticFiles(directory=STATIC), name="static")
    fastapi.add_middleware(BodyLimit, limit=server.limits.max_body_bytes)
    for kind, handler in ERROR_HANDLERS.items():
        fastapi.add_exception_handler(kind, handler)
    return fastapi


def v1_routes(server: Server, api_key: str | None) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(authorization(api_key))])

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [server.card()]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != server.name:
            raise ApiError(404, f"model {model_id!r} is not served here — GET /v1/models lists {server.name!r}",
                           "model", code="model_not_found")
        return server.card()

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        job = check_completion(req, server.m, server.limits, server.name)
        if req.stream:
            return server.stream(job, bool(req.stream_options and req.stream_options.include_usage))
        return await server.complete(request, job)

    @router.post("/next_tokens")
    async def next_tokens(req: NextTokensRequest) -> dict:
        return await server.next_tokens(req)

    return router


def authorization(api_key: str | None) -> Callable:
    """The check that a request carries `Authorization: Bearer <api_key>` (none without a key); the key is
    compared in constant time and never written anywhere."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    return check


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, refused before it is read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.too_large().response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # a chunked body, which gave no length
                raise self.too_large()
            return message

        await self.app(scope, limited, send)

    def too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over this server's limit of {self.limit} bytes (serve.max_body_bytes)")


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return e.response()


async def user_error(request: Request, e: UserError) -> JSONResponse:
    return failure(e).response()


async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    """Pydantic's first complaint in one line, naming the parameter (`temperature: Input should be less than or equal to 2`)."""
    first = e.errors()[0]
    where = [str(part) for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})").response()
    if not where:
        return ApiError(400, "the body must be a JSON object, e.g. {\"prompt\": \"이 집 짜장면은\"}").response()
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in KINDS:
        message = wrong_kind(first["input"], KINDS[first["type"]])
    return ApiError(400, f"{'.'.join(where)}: {message}", where[0]).response()


KINDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}  # pydantic's type errors


def wrong_kind(value, kind: str) -> str:
    """`"5" is a string — send an integer without quotes`: a string is never taken for a number (strict models)."""
    shown = json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        return f"{shown} is a string — send {kind} without quotes"
    return f"{shown} is not {kind} — send {kind}"


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such path, a method not allowed) in OpenAI's shape."""
    if isinstance(e.__cause__, UnicodeDecodeError):  # FastAPI: "There was an error parsing the body"
        return ApiError(400, f"the body is not UTF-8 ({e.__cause__.reason} at byte {e.__cause__.start}) — send JSON "
                             "encoded as UTF-8, e.g. {\"prompt\": \"이 집 짜장면은\"}").response()
    return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                    kind="not_found_error" if e.status_code == 404 else "invalid_request_error").response()


async def server_error(request: Request, e: Exception) -> JSONResponse:
    """A bug, not the client's doing: one line to the client, the traceback to the server's log only."""
    log.exception(f"{request.method} {request.url.path} failed")
    return failure(e).response()


def failure(e: Exception) -> ApiError:
    if isinstance(e, OutOfRange):  # a decoding option out of kr3.settings.Decoding's range, named as the request names it
        param = REQUEST_NAMES.get(e.key, e.key)
        return ApiError(400, f"{param}: {e.shown} {e.rule}", param)
    if isinstance(e, UserError):
        return ApiError(400, str(e))
    return ApiError(500, f"the server failed on this request ({type(e).__name__}) — its log has the details",
                    kind="server_error")


REQUEST_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}  # decoding options OpenAI's request names otherwise
ERROR_HANDLERS = {ApiError: api_error, UserError: user_error, RequestValidationError: invalid_request,
                  HTTPException: http_error, Exception: server_error}


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or one line saying why it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on such sockets' connections; with it
        # on, each kept-alive response waited ~40 ms for the client's delayed ACK (bench/serve_load.py found it)
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"serve.host={host} is not an address here ({e.strerror}) — use 127.0.0.1, or 0.0.0.0 for every "
                        "interface") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}) — pick another port, e.g. serve.port={port + 1}, "
                        "or serve.port=0 for any free one") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(asgi: FastAPI, sock: socket.socket) -> None:
    """Serve `asgi` on the bound socket until Ctrl-C or SIGTERM (uvicorn; streams still open get 5 s to end)."""
    import uvicorn

    config = uvicorn.Config(asgi, log_level="info", timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
