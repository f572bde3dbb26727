"""OpenAI's completions and chat completions protocol as kr3 speaks it: the request models (types only: the decoding
options' ranges are kr3.settings.Decoding's), a completion's response and its server-sent events, usage, and every
error as OpenAI's JSON error body, in one line."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from difflib import get_close_matches
from itertools import accumulate
from typing import Annotated, ClassVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from kr3.config import as_list
from kr3.errors import UserError
from kr3.settings import OutOfRange

log = logging.getLogger(__name__)

MAX_STOPS, MAX_STOP_CHARS = 4, 100  # OpenAI's 4 stop strings; short, since each is checked at every token


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


class Strict(BaseModel):
    """A request body whose misspelt field is refused (400 naming it, as OpenAI does), not silently dropped: its
    fields, the OpenAI parameters kr3 does not do (`OFF`: accepted at the values that mean "off", which clients
    send), those it ignores, and nothing else."""

    ENDPOINT: ClassVar[str] = ""
    OWN: ClassVar[tuple[str, ...]] = ()  # kr3's own fields, beside OpenAI's
    OFF: ClassVar[dict[str, tuple]] = {}
    IGNORED: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def known_fields(cls, data):
        known = {*cls.model_fields, *cls.OFF, *cls.IGNORED}
        unknown = [key for key in data if key not in known] if isinstance(data, dict) else []
        if unknown:
            raise ApiError(400, cls.unrecognized(unknown[0]), unknown[0])  # not wrapped: pydantic passes it on
        for key, value in (data.items() if isinstance(data, dict) else ()):
            if key in cls.OFF and value not in cls.OFF[key]:
                raise ApiError(400, f"{key}={json.dumps(value)} is not supported by kr3 — leave it out", key)
        return data

    @classmethod
    def unrecognized(cls, key: str) -> str:
        if key in ELSEWHERE and ELSEWHERE[key] != cls.ENDPOINT:
            return f"Unrecognized request argument supplied: {key} — it is {ELSEWHERE[key]}'s; {cls.ENDPOINT} reads " \
                   f"{next(iter(cls.model_fields.keys() & ELSEWHERE.keys()))}"
        near = get_close_matches(key, [*cls.model_fields, *cls.OFF], n=1)
        declared_here = vars(cls).get("__annotations__", {})  # prompt or messages first
        openai = sorted((k for k in cls.model_fields if k not in cls.OWN), key=lambda k: k not in declared_here)
        own = f"; kr3's own: {', '.join(cls.OWN)}" if cls.OWN else ""
        return (f"Unrecognized request argument supplied: {key}{f' — did you mean {near[0]}?' if near else ''} "
                f"({cls.ENDPOINT} takes {', '.join(openai)}{own})")


ELSEWHERE = {"prompt": "/v1/completions", "messages": "/v1/chat/completions"}  # a body sent to the other endpoint


class StreamOptions(Strict):
    ENDPOINT = "stream_options"
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


def rating_name_or_number(value):
    """`rating` as JSON gives it: a name or a number; not true/false, which pydantic would take for 1/0."""
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError('must be a rating\'s name or number, e.g. "positive" or 1')


Rating = Annotated[str | int | None, BeforeValidator(rating_name_or_number)]
OFF_PENALTIES = {"logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


class Sampling(Strict):
    """What OpenAI's completion and chat requests share: the sampling fields, and kr3's own `top_k`,
    `repetition_penalty`, `rating`, `guidance` and `min_tokens` (vLLM's name). Unset values take the server's defaults
    (stage=serve's `generate.*`); an unset seed is a random one. Their ranges are kr3.settings.Decoding's, checked once there."""

    OWN = ("top_k", "repetition_penalty", "rating", "guidance", "min_tokens")
    IGNORED = frozenset({"user"})  # names the caller, for OpenAI's abuse monitoring
    model_config = ConfigDict(allow_inf_nan=False, strict=True)  # strict: "5" is no number (OpenAI refuses it too)
    model: str | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None  # vLLM's: the end of the review is not chosen before this many tokens
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

    @field_validator("stop", mode="before")
    @classmethod
    def few_short_stops(cls, value):
        stops = as_list(value)
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"must be a string or a list of strings of 1 to {MAX_STOP_CHARS} characters")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"has {len(stops)} strings; at most {MAX_STOPS} are allowed")
        return value

    def new_tokens(self) -> int | None:
        return self.max_tokens


MAX_LOGPROBS = 5  # OpenAI's bound on `logprobs` (the most likely tokens given at each position)


def token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


class CompletionRequest(Sampling):
    """OpenAI's (legacy) completion request: a prompt as text or token ids, or a list of them; `echo` returns the
    prompt before its completion, `logprobs` each token's log-probability and the most likely tokens at its
    place, and `max_tokens=0` with `echo` scores the prompt without completing it (what lm-eval's
    local-completions model asks for)."""

    ENDPOINT = "/v1/completions"
    OFF = {"best_of": (None, 1), "suffix": (None, ""), **OFF_PENALTIES}
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def text_or_token_prompts(cls, value):
        if isinstance(value, str) or token_ids(value) or (isinstance(value, list) and value and all(
                isinstance(p, str) for p in value)) or (isinstance(value, list) and value and all(map(token_ids, value))):
            return value
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or a list of token ids."""
        one = isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int))
        return [self.prompt] if one else list(self.prompt)


class ChatMessage(BaseModel):
    """A message of a chat; its other fields (name, tool calls, …) are not read."""

    model_config = ConfigDict(strict=True)
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content, or its text parts joined (clients may send [{"type": "text", "text": …}])."""
        if not isinstance(self.content, list):
            return self.content or ""
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise ApiError(400, "messages: kr3 reads text only — give content as a string or as parts of type "
                                "\"text\"", "messages")
        return "".join(part["text"] for part in self.content)


class ChatRequest(Sampling):
    """OpenAI's chat request, for clients that speak only chat. kr3 is a review model, not a chat model: the last
    user message is the start of a review, which the assistant's reply completes; system, assistant and earlier
    messages are not read."""

    ENDPOINT = "/v1/chat/completions"
    OFF = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
           "response_format": (None, {"type": "text"}), **OFF_PENALTIES}
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    def prompts(self) -> list[str]:
        users = [message for message in self.messages if message.role == "user"]
        if not users:
            raise ApiError(400, "messages: no message of role \"user\" — kr3 completes the last user message as the "
                                "start of a review", "messages")
        return [users[-1].text()]

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class NextTokensRequest(Strict):
    ENDPOINT = "/v1/next_tokens"
    model_config = ConfigDict(allow_inf_nan=False, strict=True)
    model: str | None = None
    prompt: str = ""
    k: int = Field(10, ge=1)
    rating: Rating = None
    guidance: float | None = None  # its range: kr3.settings.Decoding's


class TokenizeRequest(Strict):
    """vLLM's `POST /tokenize`, which lm-eval's remote tokenizer uses: a text's token ids."""

    ENDPOINT = "/tokenize"
    model_config = ConfigDict(strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False  # kr3's tokenizers add none


class DetokenizeRequest(Strict):
    """vLLM's `POST /detokenize`: the text of token ids."""

    ENDPOINT = "/detokenize"
    model_config = ConfigDict(strict=True)
    model: str | None = None
    tokens: list[int]


@dataclass
class Completion:
    """One completion or chat request, checked: its prompts, decoding options and the shapes of what its responses
    carry (OpenAI's text completion, or its chat completion)."""

    prompts: list[str | list[int]]
    n: int
    options: dict  # kr3 decoding options, rating included
    model: str
    chat: bool
    echo: bool = False
    logprobs: int | None = None
    score_only: bool = False  # max_tokens=0 with echo: the prompt scored, nothing completed
    greedy_one: bool = False  # echo and logprobs of the prompt and one greedy token (lm-eval's log-likelihood request)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def choices(self) -> Iterator[tuple[int, str, int]]:
        """(index, prompt, sample): OpenAI numbers the n choices of each prompt in turn."""
        for p, prompt in enumerate(self.prompts):
            for sample in range(self.n):
                yield p * self.n + sample, prompt, sample

    def body(self, choices: list[dict], usage: dict | None = None, streamed: bool = False) -> dict:
        kind = ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        body = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{self.id}", "object": kind, "created": self.created,
                "model": self.model, "choices": choices}
        return {**body, "usage": usage} if usage is not None else body

    def whole(self, index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}

    def piece(self, index: int, text: str, finish_reason: str | None = None) -> dict:
        """A streamed event of one choice: its next text, or (finish_reason given) its end."""
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
        return self.body([choice], streamed=True)

    def opening(self, index: int) -> dict | None:
        """A chat stream opens each choice with the assistant's role, as OpenAI's does."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self.body([choice], streamed=True) if self.chat else None


def logprobs_body(entries: list[dict]) -> dict:
    """OpenAI's logprobs object of a choice from kr3.Model.logprobs' entries: its tokens as text, each one's
    log-probability (None for a prompt's first token), the most likely tokens at each place ({text: logprob}) and
    where each token starts in the choice's text."""
    pieces = [e["text"] for e in entries]
    return {"tokens": pieces, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else dict(e["top"]) for e in entries],
            "text_offset": [0, *accumulate(map(len, pieces))][: len(pieces)]}


def finish_reason(stats: dict, options: dict) -> str:
    """"length" when the completion used all its tokens, else "stop" (the end of the review or a stop string)."""
    return "length" if stats["tokens"] >= options["max_new_tokens"] else "stop"


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


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


# decoding options a request names otherwise (OpenAI's names, vLLM's min_tokens)
REQUEST_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_samples": "n"}


ERROR_HANDLERS = {ApiError: api_error, UserError: user_error, RequestValidationError: invalid_request,
                  HTTPException: http_error, Exception: server_error}
