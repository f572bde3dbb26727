"""kr3 over HTTP: an ASGI app (FastAPI) around one `kr3.Model` — OpenAI's completions API (`POST /v1/completions`,
with logprobs, echo and prompts of token ids, and `/v1/chat/completions` completing the last user message; whole or
streamed as server-sent events; `GET /v1/models`), the next-token probabilities (`POST /v1/next_tokens`), vLLM's
tokenizer endpoints (for lm-eval) and a page at `/` (kr3/static: plain HTML, CSS and JS). stage=serve runs it under
uvicorn.

Completions are queued, not batched (a scoring request's prompts are): one thread makes every model call, one token
of one completion at a time, in the order they are asked for. Concurrent streams so take turns token by token (each
with its own KV cache and seed, so a seeded completion is the same however many others run), the event loop only
waits, and a client that leaves stops its completion at the next token."""

from kr3.serve.app import Limits, app, base_model
from kr3.serve.protocol import Usage
from kr3.serve.wiring import api_key, listen, redact, run, url

__all__ = ["Limits", "Usage", "api_key", "app", "base_model", "listen", "redact", "run", "url"]
