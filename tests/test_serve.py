"""stage=serve: the OpenAI-compatible API over a tiny trained model — through FastAPI's TestClient, a real uvicorn
server on 127.0.0.1 (streams, disconnects, concurrency, the `openai` client) and the command itself."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import kr3
from kr3 import serve
from kr3.config import ROOT

PROMPT = "이 집 짜장면은"


@pytest.fixture(scope="module")
def model(served_run):
    return kr3.load(served_run, device="cpu", precision="fp32")


@pytest.fixture
def client(model):
    return TestClient(serve.app(model))


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def events(lines) -> list:
    """The data of server-sent events, [DONE] as the string."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def stream(client, **body) -> list:
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "stream": True, **body}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return events(response.iter_lines())


@pytest.mark.e2e
def test_a_completion_has_openai_s_shape(client, model):
    reply = complete(client, max_tokens=12, seed=3)
    assert reply["object"] == "text_completion" and reply["model"] == "kr3" and reply["id"].startswith("cmpl-")
    assert abs(reply["created"] - time.time()) < 60
    [choice] = reply["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    assert choice["text"] == model.complete(PROMPT, max_new_tokens=12, seed=3)  # the Python API's completion
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(model.tokenizer.encode(model.cleaned(PROMPT)))
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"promt": "hi"}, "promt"),
    ("/v1/completions", {"prompt": PROMPT, "max_token": 2, "temprature": 0}, "max_token"),
    ("/v1/completions", {"prompt": PROMPT, "stream": True, "stream_options": {"include_usag": True}}, "include_usag"),
    ("/v1/next_tokens", {"prompt": PROMPT, "kk": 3}, "kk"),
    ("/v1/completions", {"messages": [{"role": "user", "content": PROMPT}]}, "messages"),
])
def test_a_misspelt_field_is_refused_by_name(client, path, body, param):
    """As OpenAI's API does: 400 naming the field, the nearest one, and what the endpoint takes (kr3's own fields
    apart)."""
    response = client.post(path, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"Unrecognized request argument supplied: {param} — "
                              f"{'it is /v1/chat/completions' if param == 'messages' else 'did you mean '}")
    if path == "/v1/completions" and param in ("promt", "max_token"):
        assert "takes prompt, echo, logprobs, model, max_tokens, " in message and message.endswith(
            "; kr3's own: top_k, repetition_penalty, rating, guidance, min_tokens)")


CHAT = [{"role": "system", "content": "You are a food critic."}, {"role": "user", "content": "아무 말"},
        {"role": "assistant", "content": "네"}, {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]


def test_a_chat_completes_the_last_user_message(client, model):
    """/v1/chat/completions for clients that speak only chat: the last user message is the prompt, the reply the
    assistant's message, in OpenAI's chat shape (whole and streamed)."""
    response = client.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": 12, "seed": 3})
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    [choice] = reply["choices"]
    assert choice["message"] == {"role": "assistant", "content": model.complete(PROMPT, max_new_tokens=12, seed=3)}
    assert choice["finish_reason"] in ("stop", "length") and 0 < reply["usage"]["completion_tokens"] <= 12
    body = {"messages": CHAT, "max_tokens": 12, "seed": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as streamed:
        assert streamed.status_code == 200
        got = events(streamed.iter_lines())
    assert got[-1] == "[DONE]" and got[-2]["choices"] == [] and got[-2]["usage"]["completion_tokens"] > 0
    chunks = got[:-2]
    assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[-1]["finish_reason"] in ("stop", "length")
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == model.complete(PROMPT, max_new_tokens=12, seed=3, num_samples=2)[index]


@pytest.mark.parametrize("body, status, message", [
    ({"messages": [{"role": "system", "content": "hi"}]}, 400, 'messages: no message of role "user"'),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages: kr3 reads text only"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools=[{\"type\": \"function\"}] is not supported"),
    ({"messages": CHAT, "max_completion_tokens": 9999}, 400, "max_tokens: 9999 is above this server's limit"),
    ({"messages": CHAT, "temprature": 1}, 400, "Unrecognized request argument supplied: temprature"),
    ({"prompt": PROMPT}, 400, "Unrecognized request argument supplied: prompt — it is /v1/completions's; "
                              "/v1/chat/completions reads messages"),
    ({}, 400, "messages: Field required"),
])
def test_a_bad_chat_request_is_one_line(client, body, status, message):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status and response.json()["error"]["message"].startswith(message), response.text


def test_openai_parameters_kr3_does_not_use_are_accepted_when_off(client):
    assert complete(client, max_tokens=2, user="someone", best_of=1, suffix="")["usage"]["completion_tokens"] <= 2


def test_echo_with_max_tokens_0_scores_token_ids_as_score_does(client, model):
    """lm-eval's log-likelihood request: token ids, echo, max_tokens=0, logprobs. [end of review, *review, end of
    review] is the stream Model.score scores: the log-probabilities after the first sum to minus its nats."""
    review = "사장님이 친절하고 국밥이 정말 맛있어요"
    eos = model.tokenizer.eos_id
    ids = [eos, *model.tokenizer.encode(model.cleaned(review)), eos]
    reply = complete(client, prompt=[ids, ids[:4]], echo=True, max_tokens=0, logprobs=2)
    scored = model.score(review)
    first, second = (choice["logprobs"] for choice in reply["choices"])
    assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None and len(first["tokens"]) == len(ids)
    assert -sum(first["token_logprobs"][1:]) == pytest.approx(scored["loss"] * scored["tokens"], rel=1e-5)
    assert second["token_logprobs"] == pytest.approx(first["token_logprobs"][:4])  # the same tokens, the same numbers
    assert reply["choices"][0]["text"] == "".join(first["tokens"]) == model.cleaned(review)
    assert first["text_offset"] == [sum(map(len, first["tokens"][:i])) for i in range(len(ids))]
    for logprob, top in zip(first["token_logprobs"][1:], first["top_logprobs"][1:], strict=True):
        assert len(top) == 2 and max(top.values()) >= logprob - 1e-6 and all(v <= 0 for v in top.values())
    assert reply["usage"] == {"prompt_tokens": len(ids) + 4, "completion_tokens": 0, "total_tokens": len(ids) + 4}


def test_the_prompts_of_a_scoring_request_are_scored_together_as_alone(client, model):
    """Batched (padded on the right), and a prompt longer than the context in its windows, as token_loss scores."""
    import numpy as np

    from kr3.scoring import token_loss

    ids = [model.tokenizer.eos_id, *model.tokenizer.encode("사장님이 친절하고 국밥이 정말 맛있어요 또 올게요")]
    long = (ids * 60)[: model.model.cfg.block_size + 20]
    prompts = [ids[:3], long, ids, ids[:1]]
    reply = complete(client, prompt=prompts, echo=True, max_tokens=0, logprobs=0)
    for choice, prompt in zip(reply["choices"], prompts, strict=True):
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            [e["logprob"] for e in model.logprobs(prompt)[1:]], abs=1e-5)
    nats, n = token_loss(model.model, np.array(long[1:]), model.tokenizer.eos_id, model.model.cfg.block_size, 4, "cpu",
                         torch.float32, context=long[0])
    assert -sum(reply["choices"][1]["logprobs"]["token_logprobs"][1:]) == pytest.approx(nats, rel=1e-5) and n == len(long) - 1


def test_the_tokenizer_endpoints_are_the_model_s_tokenizer(client, model):
    """vLLM's /tokenizer_info, /tokenize and /detokenize, as lm-eval's remote tokenizer calls them."""
    info = client.get("/tokenizer_info").json()
    eos, text = model.tokenizer.eos_id, "사장님이 친절해요"
    ids = client.post("/tokenize", json={"prompt": info["eos_token"] + text, "add_special_tokens": False}).json()["tokens"]
    assert ids == [eos, *model.tokenizer.encode(text)]  # the end of review's text is its id
    assert client.post("/detokenize", json={"tokens": ids[1:]}).json() == {"prompt": text}
    for path, body, param, words in [("/detokenize", {"tokens": [1, 99999]}, "tokens", "token id 99999 is not in this"),
                                     ("/tokenize", {"prompt": "a", "addd": 1}, "addd", "Unrecognized request argument"),
                                     ("/tokenize", {"prompt": 3}, "prompt", "Input should be a valid string")]:
        response = client.post(path, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        assert words in response.json()["error"]["message"]


def test_logprobs_of_a_completion_are_those_of_its_tokens(client, model):
    """Greedy: each chosen token is the most likely one; with echo the prompt's tokens come first, text and all."""
    plain = complete(client, max_tokens=8, temperature=0, logprobs=1)
    echoed = complete(client, max_tokens=8, temperature=0, logprobs=1, echo=True)
    text = model.complete(PROMPT, max_new_tokens=8, temperature=0)
    assert plain["choices"][0]["text"] == text and echoed["choices"][0]["text"] == PROMPT + text
    mine, both = plain["choices"][0]["logprobs"], echoed["choices"][0]["logprobs"]
    assert "".join(mine["tokens"]) == text and len(mine["tokens"]) == plain["usage"]["completion_tokens"]
    for logprob, top in zip(mine["token_logprobs"], mine["top_logprobs"], strict=True):
        assert list(top.values()) == [pytest.approx(logprob, abs=1e-5)]
    prompt_tokens = echoed["usage"]["prompt_tokens"]
    assert both["tokens"][prompt_tokens:] == mine["tokens"] and "".join(both["tokens"][:prompt_tokens]) == PROMPT
    assert both["token_logprobs"][prompt_tokens:] == pytest.approx(mine["token_logprobs"], abs=1e-5)
    assert both["token_logprobs"][0] is None and None not in both["token_logprobs"][1:]
    assert complete(client, max_tokens=3, echo=True)["choices"][0]["text"].startswith(PROMPT)
    assert complete(client, max_tokens=3)["choices"][0]["logprobs"] is None


def test_usage_counts_each_prompt_once_as_the_model_is_given_it(client, model):
    """n samples of a prompt share it; a prompt longer than the context counts what the model kept of it."""
    long = "맛있는 짜장면 " * 400
    reply = complete(client, prompt=[PROMPT, long], n=2, max_tokens=3, seed=1)
    kept = model.model.cfg.block_size - 1  # the context less the token after it (no rating: no control token)
    assert reply["usage"]["prompt_tokens"] == len(model.tokenizer.encode(model.cleaned(PROMPT))) + kept
    assert len(reply["choices"]) == 4 and 0 < reply["usage"]["completion_tokens"] <= 4 * 3


def test_the_stream_sends_the_same_completion_in_pieces(client):
    whole = complete(client, max_tokens=20, seed=5)
    chunks = stream(client, max_tokens=20, seed=5, stream_options={"include_usage": True})
    assert chunks[-1] == "[DONE]"
    *pieces, last, used = chunks[:-1]
    assert len(pieces) > 1 and all(c["choices"][0]["finish_reason"] is None for c in pieces)
    assert "".join(c["choices"][0]["text"] for c in pieces) == whole["choices"][0]["text"]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert used["choices"] == [] and used["usage"] == whole["usage"]
    assert {c["id"] for c in chunks[:-1]} == {pieces[0]["id"]}


def test_a_seed_makes_a_completion_repeatable(client):
    first, again = (complete(client, seed=11, temperature=1.0, max_tokens=16) for _ in range(2))
    assert first["choices"] == again["choices"]
    others = {complete(client, seed=s, temperature=1.0, max_tokens=16)["choices"][0]["text"] for s in range(6)}
    assert len(others) > 1  # and no seed: a random one, so repeated requests differ
    assert len({complete(client, temperature=1.0, max_tokens=16)["choices"][0]["text"] for _ in range(6)}) > 1


def test_n_completions_of_each_prompt(client, model):
    reply = complete(client, prompt=["이 집", "여기 냉면"], n=3, seed=7, temperature=1.0, max_tokens=8)
    choices = reply["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    expected = [*model.complete("이 집", num_samples=3, seed=7, temperature=1.0, max_new_tokens=8),
                *model.complete("여기 냉면", num_samples=3, seed=7, temperature=1.0, max_new_tokens=8)]
    assert [c["text"] for c in choices] == expected  # choice i of a prompt is the API's sample i
    streamed = [c for c in stream(client, prompt=["이 집", "여기 냉면"], n=3, seed=7, temperature=1.0, max_tokens=8)
                if c != "[DONE]"]
    by_index = {i: "".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == i) for i in range(6)}
    assert list(by_index.values()) == expected


def test_a_stop_string_ends_the_completion_before_it(client):
    greedy = complete(client, temperature=0, max_tokens=30)["choices"][0]["text"]
    stop = greedy.strip()[2:4]
    assert stop, greedy
    cut = complete(client, temperature=0, max_tokens=30, stop=[stop, "없는 말"])["choices"][0]
    assert cut["text"] == greedy[: greedy.index(stop)] and cut["finish_reason"] == "stop"
    pieces = [c for c in stream(client, temperature=0, max_tokens=30, stop=stop) if c != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in pieces) == cut["text"]


def test_finish_reason_length_when_max_tokens_runs_out(client):
    reply = complete(client, max_tokens=2, temperature=0)
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 2


def test_min_tokens_holds_back_the_end_of_the_review(client):
    natural = complete(client, prompt="", max_tokens=40, temperature=0)  # the smoke model ends reviews early
    fixed = complete(client, prompt="", max_tokens=40, min_tokens=40, temperature=0)
    assert natural["usage"]["completion_tokens"] < 40 and natural["choices"][0]["finish_reason"] == "stop"
    assert fixed["usage"]["completion_tokens"] == 40 and fixed["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, param, words", [
    ({"temperature": -1}, "temperature", "temperature: -1 must be a number ≥ 0"),
    ({"temperature": "hot"}, "temperature", '"hot" is a string — send a number without quotes'),
    ({"max_tokens": "5"}, "max_tokens", '"5" is a string — send an integer without quotes'),
    ({"max_tokens": 5.5}, "max_tokens", "5.5 is not an integer"),
    ({"stream": "true"}, "stream", '"true" is a string — send true or false without quotes'),
    ({"top_p": 1.5}, "top_p", "top_p: 1.5 must be a number > 0 and ≤ 1, or null"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens: 0 must be an integer ≥ 1"),
    ({"max_tokens": 100_000}, "max_tokens", "serve.max_tokens"),
    ({"n": 99}, "n", "serve.max_n"),
    ({"prompt": ["a"] * 99}, "prompt", "serve.max_prompts"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [1, 2, 99999]}, "prompt", "token id 99999 is not in this model's vocabulary (0 to 499)"),
    ({"prompt": [[1, 2], []]}, "prompt", "a list of token ids is empty"),
    ({"prompt": [1, "a"]}, "prompt", "a list of token ids or a list of such lists"),
    ({"prompt": None}, "prompt", "string"),
    ({"stop": ""}, "stop", "1 to 100 characters"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"seed": -3}, "seed", "seed: -3 must be an integer ≥ 0"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens: -1 must be an integer ≥ 0"),
    ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"logprobs": 1, "stream": True}, "stream", "echo and logprobs come with whole completions — leave stream out"),
    ({"echo": True, "max_tokens": 0, "prompt": " "}, "prompt", "scores the prompt, and it is empty"),
    ({"rating": "positive"}, "rating", "not rating-conditioned"),
    ({"guidance": 0.5}, "guidance", "guidance: 0.5 must be a number ≥ 1 and ≤ 100"),
    ({"guidance": 1e300}, "guidance", "guidance: 1e+300 must be a number ≥ 1 and ≤ 100"),
    ({"stream_options": "yes"}, "stream_options", "dictionary"),
])
def test_a_bad_request_gets_400_saying_what_is_wrong(client, body, param, words):
    response = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path, body, words", [
    ("/v1/completions", b'{"prompt": "a", "guidance": Infinity}', "finite number"),
    ("/v1/next_tokens", b'{"prompt": "a", "guidance": 1e309}', "finite number"),
    ("/v1/completions", b'{"prompt": "a", "repetition_penalty": -Infinity}', "finite number"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', "not valid Unicode text"),
    ("/v1/next_tokens", b'{"prompt": "a\\udc80b"}', "not valid Unicode text"),
    ("/v1/completions", '{"prompt": "이 집"}'.encode("euc-kr"), "the body is not UTF-8 (invalid start byte at byte 12) — "
                                                               "send JSON encoded as UTF-8"),
])
def test_numbers_json_allows_and_text_it_cannot_hold_get_400(client, path, body, words):
    """JSON parsers take Infinity, 1e309 (inf) and lone surrogates (no UTF-8 for them): 400, not a failure inside."""
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and words in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", "\"이 집\"".encode()])
def test_a_body_that_is_not_a_json_object_gets_400(client, content):
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_unknown_paths_and_methods_get_json_errors(client):
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    response = client.get("/v1/completions")
    assert response.status_code == 405 and "Method Not Allowed" in response.json()["error"]["message"]


def test_a_bug_is_a_500_in_one_line_without_a_traceback(model, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug\nTraceback (most recent call last): secret details")

    monkeypatch.setattr(serve.Usage, "body", broken)
    response = TestClient(serve.app(model), raise_server_exceptions=False).post("/v1/completions", json={"max_tokens": 2})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"] and "Traceback" not in response.text


@pytest.mark.parametrize("where", ["completion", "step"])
def test_a_stream_that_fails_says_so_in_the_stream(model, monkeypatch, where):
    from kr3.decoder import Batch
    from kr3.sampling import Generation

    real, made = (Generation.took, Batch.decode), []
    first = model.complete(PROMPT, temperature=0, max_new_tokens=1)

    def failing(real):
        def fail_second(self, *args):
            made.append(self)
            if len(made) > (where == "completion"):  # the first token is the prefill's
                raise RuntimeError("a bug")
            return real(self, *args)
        return fail_second

    # the second token fails: in the completion (it alone fails), or in the batch's step (all in it fail)
    monkeypatch.setattr(*(Generation, "took", failing(real[0])) if where == "completion" else (Batch, "decode",
                                                                                             failing(real[1])))
    chunks = stream(TestClient(serve.app(model)), temperature=0, max_tokens=8)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == first
    assert chunks[-1]["error"]["type"] == "server_error" and "RuntimeError" in chunks[-1]["error"]["message"]


def test_request_bodies_are_bounded(model):
    client = TestClient(serve.app(model, serve.Limits.defaults(max_body_bytes=1000)))
    big = {"prompt": "맛" * 2000}
    response = client.post("/v1/completions", json=big)
    assert response.status_code == 413 and "serve.max_body_bytes" in response.json()["error"]["message"]
    chunked = client.post("/v1/completions", content=iter([json.dumps(big).encode()[:600]] * 3),
                          headers={"content-type": "application/json"})  # no content-length: counted as it comes
    assert chunked.status_code == 413
    assert client.post("/v1/completions", json={"prompt": "맛", "max_tokens": 1}).status_code == 200


def test_an_api_key_is_required_when_set_and_never_logged(model, caplog, capsys):
    key = "sk-kr3-test-8f1e"
    client = TestClient(serve.app(model, api_key=key))
    with caplog.at_level(logging.DEBUG):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"Authorization": f"Basic {key}"}):
            response = client.post("/v1/completions", json={"max_tokens": 1}, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        ok = {"Authorization": f"Bearer {key}"}
        assert client.post("/v1/completions", json={"max_tokens": 1}, headers=ok).status_code == 200
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.get("/").status_code == 200 and client.get("/health").status_code == 200  # the page asks for the key
    assert key not in caplog.text and key not in "".join(capsys.readouterr())


def test_models_lists_the_served_model(model):
    client = TestClient(serve.app(model, name="kr3-tiny"))
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == "kr3-tiny" and card["object"] == "model" and card["owned_by"] == "kr3"
    assert card["kr3"]["context_length"] == model.model.cfg.block_size and card["kr3"]["ratings"] is None
    assert client.get("/v1/models/kr3-tiny").json() == card
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert complete(client, max_tokens=1)["model"] == "kr3-tiny"


def test_next_tokens_are_the_api_s(client, model):
    reply = client.post("/v1/next_tokens", json={"prompt": PROMPT, "k": 7}).json()
    expected = model.next_tokens(PROMPT, 7)
    assert [t["text"] for t in reply["tokens"]] == [text for text, _ in expected]
    assert [t["probability"] for t in reply["tokens"]] == pytest.approx([p for _, p in expected])
    assert reply["prompt"] == model.cleaned(PROMPT)
    ends = client.post("/v1/next_tokens", json={"prompt": "", "k": 50}).json()["tokens"]
    assert [t["end_of_review"] for t in ends] == [t["text"] == "<end of review>" for t in ends]
    too_many = client.post("/v1/next_tokens", json={"prompt": PROMPT, "k": 51})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "k"


def test_the_page_is_served_and_needs_nothing_from_outside(client):
    page = client.get("/")
    assert page.status_code == 200 and 'lang="ko"' in page.text
    for path in re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text):
        assert client.get(path).status_code == 200
    for path in (ROOT / "kr3" / "static").rglob("*.*"):
        if path.suffix not in {".html", ".css", ".js", ".svg"}:
            continue  # fonts and their licence: the browser loads nothing they name
        text = re.sub(r'xmlns="[^"]*"', "", path.read_text())  # an SVG namespace names, it loads nothing
        assert not re.search(r"https?://", text), f"{path.name} loads something from outside"
    assert "Noto Sans CJK KR" in client.get("/static/style.css").text  # a font with Hangul, from the system


@pytest.fixture(scope="module")
def rated_model(rated_run):
    return kr3.load(rated_run, device="cpu", precision="fp32")


@pytest.mark.e2e
def test_a_rating_conditioned_checkpoint_takes_a_rating(rated_model):
    client = TestClient(serve.app(rated_model))
    ratings = client.get("/v1/models").json()["data"][0]["kr3"]["ratings"]
    assert ratings == rated_model.ratings == ["negative", "positive", "ambiguous"]
    options = {"seed": 4, "temperature": 1.0, "max_tokens": 10}
    by_name = complete(client, rating="positive", **options)["choices"][0]["text"]
    assert by_name == complete(client, rating=1, **options)["choices"][0]["text"]
    assert by_name == rated_model.complete(PROMPT, rating="positive", seed=4, temperature=1.0, max_new_tokens=10)
    streamed = stream(client, rating="positive", **options)[:-1]
    assert "".join(c["choices"][0]["text"] for c in streamed) == by_name
    charts = [client.post("/v1/next_tokens", json={"prompt": PROMPT, "rating": r}).json()["tokens"] for r in ratings]
    assert [t["text"] for t in charts[0]] == [t for t, _ in rated_model.next_tokens(PROMPT, 10, rating="negative")]
    assert len({json.dumps(c) for c in charts}) == 3  # each rating is its own context
    plain = complete(client, rating="positive", guidance=1, **options)["choices"][0]["text"]
    assert plain == rated_model.complete(PROMPT, rating="positive", guidance=1, seed=4, temperature=1.0, max_new_tokens=10)
    unguided = client.post("/v1/next_tokens", json={"prompt": PROMPT, "rating": "negative", "guidance": 1}).json()
    assert unguided["tokens"] != charts[0]
    for bad, words in (("great", "negative, positive, ambiguous"), (3, "or 0 to 2"), (-1, "or 0 to 2"), (True, "number")):
        response = client.post("/v1/completions", json={"prompt": PROMPT, "rating": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "rating"
        assert words in response.json()["error"]["message"]


class Endless:
    """model.generation, but its completions never end by themselves (no EOS, no token limit) and take a few ms per
    token: the tokens made, counted, and whether the completion left the batch."""

    def __init__(self, model):
        self.real, self.made, self.closed = model.generation, 0, threading.Event()

    def __call__(self, *args, **options):
        g = self.real(*args, **options)
        g.max_new_tokens, g.eos_id = 10**9, -1
        take, end = g.take, g.end

        def slowly(token):
            time.sleep(0.005)
            self.made += 1
            take(token)

        def ended():
            self.closed.set()
            end()

        g.take, g.end = slowly, ended
        return g


def test_a_client_that_leaves_stops_its_generation(model, live_server, monkeypatch):
    endless = Endless(model)
    monkeypatch.setattr(model, "generation", endless)
    base = live_server(serve.app(model))
    with httpx.stream("POST", f"{base}/v1/completions", json={"prompt": PROMPT, "stream": True}, timeout=10) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n > 20:
                break
    assert endless.closed.wait(5), "the generation went on after the client left"
    assert endless.made < 21 + 100, endless.made  # stopped soon after the client left (0.5 s of pieces), not at 5 s
    assert httpx.get(f"{base}/health").json()["active"] == 0


@pytest.mark.e2e
def test_a_client_that_leaves_a_whole_completion_stops_it_too(model, live_server, monkeypatch):
    endless = Endless(model)
    monkeypatch.setattr(model, "generation", endless)
    base = live_server(serve.app(model))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT}, timeout=0.5)
    assert endless.closed.wait(5), "the generation went on after the client left"


def test_requests_beyond_max_active_get_429(model, live_server, monkeypatch):
    monkeypatch.setattr(model, "generation", Endless(model))
    base = live_server(serve.app(model, serve.Limits.defaults(max_active=1)))
    with httpx.stream("POST", f"{base}/v1/completions", json={"prompt": PROMPT, "stream": True}, timeout=10) as held:
        lines = held.iter_lines()  # kept: an iterator dropped would close the connection
        next(lines)
        busy = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT}, timeout=10)
        assert busy.status_code == 429 and "serve.max_active" in busy.json()["error"]["message"]
    deadline = time.monotonic() + 5
    while httpx.get(f"{base}/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.post(f"{base}/v1/next_tokens", json={"prompt": PROMPT}, timeout=10).status_code == 200


@pytest.mark.e2e
def test_concurrent_clients_share_the_model_and_get_their_own_completions(model, live_server, monkeypatch):
    from kr3.decoder import Batch

    sizes, decode = [], Batch.decode
    monkeypatch.setattr(Batch, "decode", lambda self: sizes.append(len(self.owners)) or decode(self))
    base = live_server(serve.app(model))

    def one(seed: int) -> str:
        body = {"prompt": PROMPT, "stream": True, "seed": seed, "temperature": 1.0, "max_tokens": 24}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            chunks = events(response.iter_lines())
        assert chunks[-1] == "[DONE]"
        return "".join(c["choices"][0]["text"] for c in chunks[:-1])

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, seed) for seed in range(16)]
        ticks = []  # /health while the completions are generated: answered by the event loop, not after the model
        while not all(f.done() for f in futures):
            ticks.append(httpx.get(f"{base}/health", timeout=5).elapsed.total_seconds())
            time.sleep(0.01)
        texts = [f.result() for f in futures]
    assert texts == [model.complete(PROMPT, seed=s, temperature=1.0, max_new_tokens=24) for s in range(16)]
    assert len(ticks) >= 3 and max(ticks) < 1.0, ticks
    assert max(sizes) > 1  # decoded together, not in turn


def test_the_servers_connections_have_nagle_off():
    """Answers on a kept-alive connection go out at once: with Nagle's algorithm on, each waited ~40 ms for the
    client's delayed ACK (bench/serve_load.py found it). asyncio, under uvicorn, turns it off on the connections
    of a socket made as `serve.listen` makes it."""
    import asyncio

    async def accepted_nodelay() -> int:
        sock = serve.listen("127.0.0.1", 0)
        accepted = asyncio.get_running_loop().create_future()

        async def on_connect(reader, writer):
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        _, client = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(accepted, 5)
        finally:
            client.close()
            server.close()

    assert asyncio.run(accepted_nodelay())


@pytest.mark.e2e
def test_the_openai_client_works_unchanged(model, live_server):
    openai = pytest.importorskip("openai", reason="the openai package is a dev dependency: uv sync installs it")
    base = live_server(serve.app(model, api_key="sk-local"))
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-local", max_retries=0)
    assert [m.id for m in client.models.list()] == ["kr3"]
    reply = client.completions.create(model="kr3", prompt=PROMPT, max_tokens=10, seed=2, temperature=0.7, top_p=0.9)
    reply_text = model.complete(PROMPT, max_new_tokens=10, seed=2, temperature=0.7, top_p=0.9)
    assert reply.choices[0].text == reply_text
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    pieces = list(client.completions.create(model="kr3", prompt=PROMPT, max_tokens=10, seed=2, temperature=0.7,
                                            top_p=0.9, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == reply.choices[0].text
    with pytest.raises(openai.BadRequestError, match="temperature: -1 must be a number ≥ 0"):
        client.completions.create(model="kr3", prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: promt — did you mean prompt"):
        client.completions.create(model="kr3", prompt=PROMPT, extra_body={"promt": "hi"})
    reply = client.completions.create(model="kr3", prompt=PROMPT, max_tokens=3, extra_body={"top_k": 5, "rating": None})
    assert reply.usage.completion_tokens <= 3  # kr3's own fields pass through extra_body
    chat = client.chat.completions.create(model="kr3", messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                          seed=2, temperature=0.7, top_p=0.9)
    assert chat.choices[0].message.content == reply_text and chat.choices[0].message.role == "assistant"
    pieces = list(client.chat.completions.create(model="kr3", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=10, seed=2, temperature=0.7, top_p=0.9, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == reply_text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    greedy = client.completions.create(model="kr3", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    logprobs = greedy.choices[0].logprobs
    assert greedy.choices[0].text == PROMPT + model.complete(PROMPT, max_new_tokens=6, temperature=0)
    assert "".join(logprobs.tokens) == greedy.choices[0].text and logprobs.token_logprobs[0] is None
    assert all(len(top) == 2 for top in logprobs.top_logprobs[1:]) and len(logprobs.text_offset) == len(logprobs.tokens)
    eos = model.tokenizer.eos_id
    scored = client.completions.create(model="kr3", prompt=[[eos, *model.tokenizer.encode(PROMPT)]], echo=True,
                                       max_tokens=0, logprobs=0)
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [e["logprob"] for e in model.logprobs([eos, *model.tokenizer.encode(PROMPT)])[1:]], abs=1e-5)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="kr3", prompt=PROMPT, logprobs=9)


def run_py(root, *args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KR3_API_KEY", None)
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), "stage=serve", f"paths.root_dir={root}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


@pytest.mark.e2e
def test_stage_serve_serves_until_interrupted(served_run, tmp_path):
    proc = run_py(tmp_path, f"checkpoint={served_run}", "serve.port=0", "serve.api_key=sk-never-written",
                  "serve.device=cpu", "serve.precision=fp32")  # the seeded draw the same on every machine
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if match := re.search(r"serving (http://127\.0\.0\.1:\d+/)", line):
                break
        assert match, "".join(lines)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{match[1]}health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health.json()["status"] == "ok"
        denied = httpx.post(f"{match[1]}v1/completions", json={"max_tokens": 1}, timeout=10)
        assert denied.status_code == 401
        ok = httpx.post(f"{match[1]}v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "seed": 0}, timeout=30,
                        headers={"Authorization": "Bearer sk-never-written"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
    assert proc.returncode in (0, 130), rest
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "sk-never-written" in p.read_text(errors="ignore")]
    assert not written and "sk-never-written" not in "".join(lines) + rest


def test_the_key_comes_from_serve_api_key_else_kr3_api_key(monkeypatch):
    from omegaconf import OmegaConf

    from kr3.errors import UserError

    monkeypatch.delenv("KR3_API_KEY", raising=False)
    assert serve.api_key(OmegaConf.create({"api_key": None})) is None
    monkeypatch.setenv("KR3_API_KEY", "sk-from-env")
    assert serve.api_key(OmegaConf.create({"api_key": None})) == "sk-from-env"
    assert serve.api_key(OmegaConf.create({"api_key": "sk-given"})) == "sk-given"
    monkeypatch.setenv("KR3_API_KEY", " ")
    with pytest.raises(UserError, match=r"the API key is empty \(serve.api_key or KR3_API_KEY\) — give a key"):
        serve.api_key(OmegaConf.create({"api_key": None}))


@pytest.mark.e2e
def test_a_port_in_use_is_one_line(served_run, tmp_path):
    taken = serve.listen("127.0.0.1", 0)
    port = taken.getsockname()[1]
    taken.listen()
    try:
        proc = run_py(tmp_path, f"checkpoint={served_run}", f"serve.port={port}")
        out = proc.communicate(timeout=120)[0]
    finally:
        taken.close()
    assert proc.returncode == 2 and f"error: cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out



def test_lm_eval_s_request_is_answered_in_a_batch_as_decoding_would(client, model):
    """echo + logprobs + max_tokens=1 at temperature 0 (what lm-eval sends for each log-likelihood): the prompts
    scored together and each given the token greedy decoding picks, with its log-probability last."""
    eos = model.tokenizer.eos_id
    prompts = [[eos, *model.tokenizer.encode(text)] for text in ("이 집 짜장면은", "사장님이 친절하고 국밥이", "여기")]
    reply = complete(client, prompt=prompts, echo=True, max_tokens=1, logprobs=1, temperature=0)
    for choice, ids in zip(reply["choices"], prompts, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt's tokens, then the chosen one
        expected = model.complete(ids, max_new_tokens=1, temperature=0)
        assert choice["text"] == "".join(logprobs["tokens"]) == model.tokenizer.decode(ids) + expected
        assert logprobs["token_logprobs"][1:] == pytest.approx(
            [e["logprob"] for e in model.logprobs(ids)[1:]] + [max(logprobs["top_logprobs"][-1].values())], abs=1e-5)
    assert reply["usage"]["completion_tokens"] == sum(1 for c in reply["choices"] if c["finish_reason"] == "length")
