"""stage=serve under load, on the loopback only: a server started here (`run.py stage=serve` on 127.0.0.1, a free
port), first one streaming client alone, then `--clients` concurrent streaming clients, each for a fixed time, then
the server is stopped. Reports requests/s, completion tokens/s, time to first token and whole-request latency
(p50/p99), errors (a status other than 200, a broken stream, or one without `data: [DONE]`), and the clients' tokens/s
as a multiple of one client's.

    uv run python bench/serve_load.py [--checkpoint PATH] [--clients 32] [--seconds 30] [--single-seconds 10] [--threads N]
                                      [--max-tokens 64] [--min-tokens N]

`--min-tokens` (the request's `min_tokens`) holds back the end of the review: equal to --max-tokens, every completion
has that length, so the load is decoding, not the model's own review lengths (what vLLM's serving benchmark does with
ignore_eos).

Without --checkpoint it trains one first: `--model` (tiny: seconds; small: model=small, the shape of the
generation-latency benchmark) for `--steps` steps on `harness.synthetic_corpus`'s synthetic Korean corpus, in `--out`.
The table is headed by the machine (bench/harness.py).
"""

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
import httpx

PROMPTS = ["이 집 짜장면은", "분위기가 좋고", "사장님이 친절해서", "가격 대비", "웨이팅이 길었지만", "", "국물이", "다시는"]


def free_port() -> int:
    from kr3.serve import listen

    with listen("127.0.0.1", 0) as sock:
        return sock.getsockname()[1]


def start_server(checkpoint: Path, out: Path, port: int, extra: list[str]) -> subprocess.Popen:
    log = open(out / "serve.log", "w")
    return subprocess.Popen(harness.kr3_command("stage=serve", f"checkpoint={checkpoint}", f"serve.port={port}",
                                                f"paths.root_dir={out}", "serve.max_active=256", *extra),
                            stdout=log, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if k != "KR3_API_KEY"})


def wait_ready(base: str, server: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    sys.exit("the server did not start:\n" + (out / "serve.log").read_text()[-3000:])


async def one_request(client: httpx.AsyncClient, base: str, lengths: dict) -> dict:
    """One streamed completion: its time to first text, whole time, tokens, and whether it went wrong."""
    body = {"prompt": random.choice(PROMPTS), **lengths, "stream": True, "seed": random.randrange(2**31),
            "stream_options": {"include_usage": True}}
    start, first, tokens, done = time.perf_counter(), None, 0, False
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"status {response.status_code}"}
            async for line in response.aiter_lines():
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(data)
                    if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                        first = time.perf_counter() - start
                    tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"error": type(e).__name__}
    seconds = time.perf_counter() - start
    return {"ttft": first or seconds, "seconds": seconds, "tokens": tokens} if done else {"error": "no [DONE]"}


async def client_loop(client: httpx.AsyncClient, base: str, until: float, lengths: dict, results: list) -> None:
    while time.perf_counter() < until:
        results.append(await one_request(client, base, lengths))


async def load(base: str, clients: int, seconds: float, lengths: dict) -> dict:
    """`clients` clients, each sending one streamed request after another for `seconds`."""
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, base, start + seconds, lengths, results) for _ in range(clients)))
        wall = time.perf_counter() - start
    return summary(results, clients, wall)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(results: list[dict], clients: int, wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    ttft, secs = [r["ttft"] for r in ok], [r["seconds"] for r in ok]
    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_per_s": len(ok) / wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "latency_p50": pct(secs, 50), "latency_p99": pct(secs, 99), "tokens_per_request": statistics.mean(
                r["tokens"] for r in ok), "errors": len(results) - len(ok),
            "error_kinds": sorted({r["error"] for r in results if "error" in r})}


COLUMNS = ["clients", "requests", "requests/s", "tokens/s", "tokens/request", "TTFT p50", "TTFT p99", "latency p50",
           "latency p99", "errors"]


def table_rows(rows: list[dict]) -> list[list]:
    return [[r["clients"], r["requests"], f"{r['req_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_request']:.1f}",
             f"{r['ttft_p50'] * 1e3:.0f} ms", f"{r['ttft_p99'] * 1e3:.0f} ms", f"{r['latency_p50'] * 1e3:.0f} ms",
             f"{r['latency_p99'] * 1e3:.0f} ms", r["errors"]] for r in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint or run folder; default: train one")
    ap.add_argument("--model", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kr3-serve-bench"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--single-seconds", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=0, help="the end of the review held back until this many tokens")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, help="serve.threads (default: torch's, every core)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    checkpoint = a.checkpoint or harness.trained_checkpoint(a.out, a.model, a.steps)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(checkpoint, a.out, port, [f"serve.precision={a.precision}",
                                                    *([f"serve.threads={a.threads}"] if a.threads else [])])
    try:
        wait_ready(base, server, a.out)
        lengths = {"max_tokens": a.max_tokens, "min_tokens": a.min_tokens}
        rows = [asyncio.run(load(base, 1, a.single_seconds, lengths)), asyncio.run(load(base, a.clients, a.seconds, lengths))]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    harness.print_table(COLUMNS, table_rows(rows),
                        f"checkpoint {checkpoint}, precision {a.precision}, serve.threads {a.threads or 'default'}, "
                        f"max_tokens {a.max_tokens}, min_tokens {a.min_tokens}, {os.cpu_count()} CPUs, "
                        f"load average {load_avg} (1, 5, 15 min) at the end: other work on the machine shows here")
    print(f"{a.clients} clients: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.1f}x one client's tokens/s")
    for row in rows:
        if row["errors"]:
            print(f"{row['clients']} clients: errors {row['error_kinds']}")


if __name__ == "__main__":
    main()
