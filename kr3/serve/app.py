"""The ASGI app (FastAPI) around one `kr3.Model`: `POST /v1/completions` and `/v1/chat/completions` (whole or
streamed), `GET /v1/models`, `POST /v1/next_tokens`, `/health` and the page at `/` (kr3/static); its limits, its API
key check and its body limit."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import accumulate
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from kr3 import ratings
from kr3.api import Model, decoding_options
from kr3.config import default_block
from kr3.errors import UserError
from kr3.sampling import END_OF_REVIEW
from kr3.serve.protocol import (
    ERROR_HANDLERS,
    ApiError,
    ChatRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    NextTokensRequest,
    Sampling,
    TokenizeRequest,
    Usage,
    failure,
    finish_reason,
    logprobs_body,
    sse,
)
from kr3.serve.worker import Disconnected, EventStream, ModelThread

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent.parent / "static"  # kr3/static


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
    max_batch: int

    @classmethod
    def of(cls, serve_cfg, **changes: int) -> Limits:
        """From the `serve:` settings (or conf/config.yaml's block as a dict), with `changes`."""
        get = serve_cfg.get if isinstance(serve_cfg, Mapping) else lambda key: getattr(serve_cfg, key)
        return cls(**{**{f.name: int(get(f.name)) for f in fields(cls)}, **changes})

    @classmethod
    def defaults(cls, **changes: int) -> Limits:
        """conf/config.yaml's, with `changes`."""
        return cls.of(default_block("serve"), **changes)


def check_rating(m: Model, rating: str | int | None) -> str | int | None:
    """`rating` as given, once kr3's own check (kr3.ratings.control) accepts it for this checkpoint."""
    try:
        ratings.control(rating, m.checkpoint.condition)
    except UserError as e:
        raise ApiError(400, str(e), "rating") from None
    return rating


def check_completion(req: Sampling, m: Model, limits: Limits, name: str) -> Completion:
    """A completion or chat request as a Completion, or the ApiError that says what is wrong with it."""
    prompts, n = req.prompts(), req.n or 1
    bounds = (("prompt", len(prompts), limits.max_prompts, "max_prompts"), ("n", n, limits.max_n, "max_n"),
              ("max_tokens", req.new_tokens() or 0, limits.max_tokens, "max_tokens"))
    for param, value, bound, key in bounds:
        if value > bound:
            raise ApiError(400, f"{param}: {value} is above this server's limit of {bound} (serve.{key})", param)
    if not prompts:
        raise ApiError(400, "prompt: the list is empty — give a string or a list of strings", "prompt")
    echo, logprobs = getattr(req, "echo", False) or False, getattr(req, "logprobs", None)
    if req.stream and (echo or logprobs is not None):
        raise ApiError(400, "echo and logprobs come with whole completions — leave stream out", "stream")
    score_only = echo and req.new_tokens() == 0
    for prompt in prompts:
        check_prompt(prompt, m, score_only)
    options = request_options(req, m, limits, new_tokens=1 if score_only else req.new_tokens())
    unguided = options["rating"] is None or options["guidance"] == 1
    greedy_one = echo and logprobs is not None and req.new_tokens() == 1 and n == 1 and options["temperature"] == 0 \
        and unguided and not options["stop"]
    return Completion(prompts, n, options, name, chat=isinstance(req, ChatRequest), echo=echo, logprobs=logprobs,
                      score_only=score_only, greedy_one=greedy_one)


def check_prompt(prompt: str | list[int], m: Model, score_only: bool) -> None:
    """A prompt of token ids holds ids of this model's tokenizer; one to be scored holds something to score."""
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError(400, "prompt: a list of token ids is empty", "prompt")
        vocab = m.tokenizer.vocab_size
        if bad := next((i for i in prompt if not 0 <= i < vocab), None):
            raise ApiError(400, f"prompt: token id {bad} is not in this model's vocabulary (0 to {vocab - 1})", "prompt")
    elif score_only and not m.cleaned(prompt):
        raise ApiError(400, "prompt: max_tokens=0 with echo scores the prompt, and it is empty — give a prompt",
                       "prompt")


def request_options(req: Sampling, m: Model, limits: Limits, new_tokens: int | None) -> dict:
    """The request's sampling parameters as kr3 decoding options over the server's defaults, checked."""
    given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
             "repetition_penalty": req.repetition_penalty, "stop": req.stop, "rating": check_rating(m, req.rating),
             "guidance": req.guidance, "min_new_tokens": req.min_tokens}
    default_tokens = min(m.defaults["max_new_tokens"], limits.max_tokens)
    options = {"max_new_tokens": default_tokens if new_tokens is None else new_tokens,
               "seed": secrets.randbelow(2**31) if req.seed is None else req.seed, "num_samples": 1,
               **{k: v for k, v in given.items() if v is not None}}
    return decoding_options(options, m.defaults)  # a UserError left: 400 (user_error)


class Server:
    """The app's handlers over one Model, its limits and its model thread."""

    def __init__(self, m: Model, limits: Limits, name: str):
        self.m, self.limits, self.name = m, limits, name
        self.thread = ModelThread(lambda: m.batch(limits.max_batch), limits.max_active)

    async def answer(self, req: Sampling, request: Request):
        """A completion or chat request's response: whole, or streamed as server-sent events."""
        job = check_completion(req, self.m, self.limits, self.name)
        if req.stream:
            return self.stream(job, bool(req.stream_options and req.stream_options.include_usage))
        return await self.complete(request, job)

    async def complete(self, request: Request, job: Completion) -> dict:
        """A whole completion response; stops when the client leaves (its error response is never read)."""
        self.thread.admit()
        choices, usage = [], Usage()
        try:
            if job.score_only or job.greedy_one:
                return await self.thread.call(self.scored, job)
            done = await together([self.choice(request, job, *c) for c in job.choices()])  # decoded side by side
            for (_, _, sample), (choice, stats) in zip(job.choices(), done, strict=True):
                choices.append(choice)
                usage.add(stats, sample)
        except Disconnected:
            raise ApiError(400, "the client closed the connection") from None
        finally:
            self.thread.release()
        return job.body(choices, usage.body())

    async def choice(self, request: Request, job: Completion, index: int, prompt: str | list[int],
                     sample: int) -> tuple[dict, dict]:
        """One whole choice of a completion request, and its completion's stats."""
        make = partial(self.m.generation, prompt, sample, **job.options)
        *_, stats = [item async for item in self.thread.decode(make, request.is_disconnected)]
        text, logprobs = await self.thread.call(self.shown, prompt, stats, job)
        return job.whole(index, text, finish_reason(stats, job.options), logprobs), stats

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids, whole: as given, or its text cleaned as in training and encoded."""
        return list(prompt) if isinstance(prompt, list) else self.m.tokenizer.encode(self.m.cleaned(prompt))

    def scored(self, job: Completion) -> dict:
        """The response to a request that scores its prompts (max_tokens=0 with echo) or scores them and adds one
        greedy token (what lm-eval asks), all of them in batches: each choice the prompt's text, then the token's, and
        when asked for their logprobs."""
        prompts = [self.prompt_ids(prompt) for prompt in job.prompts]
        rating, eos = job.options.get("rating"), self.m.tokenizer.eos_id
        # the chosen token is in the logprobs even when it is the end of review (no text): clients drop the last one
        full = [[*p, t] for p, t in zip(prompts, self.m.greedy_next_of_many(prompts, rating), strict=True)] \
            if job.greedy_one else prompts
        many = self.m.logprobs_of_many(full, job.logprobs, rating) if job.logprobs is not None else [None] * len(full)
        choices, usage = [], Usage()
        for index, _, sample in job.choices():
            p = index // job.n
            tokens = int(job.greedy_one and full[p][-1] != eos)
            text = "".join(e["text"] for e in many[p]) if many[p] is not None else "".join(self.m.pieces(full[p]))
            reason = "stop" if job.greedy_one and not tokens else "length"
            choices.append(job.whole(index, text, reason, logprobs_body(many[p]) if many[p] is not None else None))
            usage.add({"prompt_tokens": len(prompts[p]), "tokens": tokens}, sample)
        return job.body(choices, usage.body())

    def shown(self, prompt: str | list[int], stats: dict, job: Completion) -> tuple[str, dict | None]:
        """A choice's text and, when asked for, its logprobs object: with echo, of the whole prompt first (scored in
        windows when it is longer than the context, so that a client's token counts hold), then of the completion's
        tokens — those of its text (a stop string cut the rest) — after the prompt (with echo the whole prompt,
        else as the model was given it)."""
        given, new, completion = stats["given"], stats["ids"], stats["completion"]
        if not job.echo and job.logprobs is None:  # a plain completion: nothing to decode again
            return completion, None
        context = (self.prompt_ids(prompt) or given) if job.echo else given
        if job.logprobs is None:
            return "".join(self.m.pieces(context)) + completion, None
        lengths = list(accumulate(map(len, self.m.pieces([*given, *new])[len(given) :])))
        kept = new[: bisect_right(lengths, len(completion))]
        entries = self.m.logprobs([*context, *kept], job.logprobs, job.options.get("rating"))
        prompt_text = "".join(e["text"] for e in entries[: len(context)]) if job.echo else ""
        return prompt_text + completion, logprobs_body(entries[0 if job.echo else len(context) :])

    def stream(self, job: Completion, include_usage: bool) -> EventStream:
        self.thread.admit()
        return EventStream(self.events(job, include_usage), self.thread.release)

    async def events(self, job: Completion, include_usage: bool) -> AsyncIterator[str]:
        """The completion as server-sent events: its pieces of text as they come, each choice's finish_reason in a
        last event of its own, the usage (when asked for) and `data: [DONE]`."""
        usage = Usage()
        try:
            for index, prompt, sample in job.choices():
                if opening := job.opening(index):
                    yield sse(opening)
                async for item in self.thread.decode(partial(self.m.generation, prompt, sample, **job.options)):
                    if isinstance(item, str):
                        yield sse(job.piece(index, item))
                    else:
                        usage.add(item, sample)
                        yield sse(job.piece(index, "", finish_reason(item, job.options)))
        except Disconnected:
            return
        except Exception as e:  # the response has begun: the error goes into the stream, the traceback to the log
            log.exception("a streamed completion failed")
            yield sse(failure(e).body())
            return
        if include_usage:
            yield sse(job.body([], usage.body(), streamed=True))
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

    def tokenizer_info(self) -> dict:
        """What a remote tokenizer client (lm-eval's) needs besides /tokenize and /detokenize."""
        return {"eos_token": self.eos_token(), "bos_token": None, "pad_token": None,
                "model_max_length": self.m.model.cfg.block_size}

    def eos_token(self) -> str:
        return self.m.tokenizer.id_to_piece(self.m.tokenizer.eos_id)

    def tokenize(self, req: TokenizeRequest) -> dict:
        """The text's token ids as the model's tokenizer gives them, the end-of-review token's text (tokenizer_info's
        eos_token) its id: clients score [end of review, *review] as kr3 does."""
        tokens = self.m.token_ids(req.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.m.model.cfg.block_size}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        vocab = self.m.tokenizer.vocab_size
        if bad := next((i for i in req.tokens if not 0 <= i < vocab), None):
            raise ApiError(400, f"tokens: token id {bad} is not in this model's vocabulary (0 to {vocab - 1})", "tokens")
        return {"prompt": self.m.tokenizer.decode(req.tokens)}

    def card(self) -> dict:
        """This model as /v1/models lists it; `kr3` holds what the page needs."""
        d = self.m.defaults
        return {"id": self.name, "object": "model", "created": int(self.m.path.stat().st_mtime), "owned_by": "kr3",
                "kr3": {"ratings": self.m.ratings, "context_length": self.m.model.cfg.block_size,
                        "step": self.m.checkpoint.step, "limits": asdict(self.limits), "base_model": base_model(self.m),
                        "defaults": {"max_tokens": min(d["max_new_tokens"], self.limits.max_tokens),
                                     "temperature": d["temperature"], "top_p": d["top_p"], "guidance": d["guidance"]}}}


async def together(coroutines: list) -> list:
    """The results of coroutines run side by side; when one fails, the others are cancelled (their completions leave
    the batch) and its error is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


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
    fastapi.include_router(tokenizer_routes(server, api_key))
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
        return await server.answer(req, request)

    @router.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await server.answer(req, request)

    @router.post("/next_tokens")
    async def next_tokens(req: NextTokensRequest) -> dict:
        return await server.next_tokens(req)

    return router


def tokenizer_routes(server: Server, api_key: str | None) -> APIRouter:
    """vLLM's tokenizer endpoints, so that lm-eval's local-completions model needs no tokenizer of its own."""
    router = APIRouter(dependencies=[Depends(authorization(api_key))])

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return server.tokenizer_info()

    @router.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        return server.tokenize(req)

    @router.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        return server.detokenize(req)

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
