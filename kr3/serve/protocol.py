"""OpenAI's completions protocol as kr3 speaks it: the request models (types only: the decoding options' ranges are
kr3.settings.Decoding's), a completion's response and its server-sent events, usage, and every error as OpenAI's JSON
error body, in one line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from kr3.config import as_list
from kr3.errors import UserError
from kr3.settings import OutOfRange

log = logging.getLogger(__name__)

MAX_STOPS, MAX_STOP_CHARS = 4, 100  # OpenAI's 4 stop strings; short, since each is checked at every token


# OpenAI parameters kr3 does not do: accepted at the values that mean "off" (clients send them), refused otherwise
UNSUPPORTED = {"echo": (None, False), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
               "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


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


REQUEST_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}  # decoding options OpenAI's request names otherwise


ERROR_HANDLERS = {ApiError: api_error, UserError: user_error, RequestValidationError: invalid_request,
                  HTTPException: http_error, Exception: server_error}
