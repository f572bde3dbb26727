"""Fixtures: a small synthetic Korean review corpus, KR3-shaped files of it, the shared real data (skipped
when ../shared is absent), and configs built with kr3.config.compose."""

import io
import itertools
import logging
import os
import random
import subprocess
import sys
import time
import unicodedata
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from kr3.config import compose

SHARED = Path(__file__).resolve().parents[2] / "shared"

_SUBJ = ["이 집", "여기", "우리 동네 식당", "사장님", "이 가게", "저희 가족", "친구랑 간 곳", "점심 식당"]
_FOOD = ["짜장면", "김치찌개", "떡볶이", "삼겹살", "비빔밥", "냉면", "치킨", "파스타", "커피", "국밥"]
_VERB = ["정말 맛있어요", "너무 짜요", "양이 많아요", "가격이 착해요", "별로였어요", "또 올게요", "친절해요",
         "다시는 안 가요", "최고입니다", "그냥 그래요", "웨이팅이 길어요", "분위기가 좋아요"]
_TAIL = ["", "!", "!!", " ㅋㅋ", " ㅠㅠ", ".", " 추천합니다", " 😋", " 강추"]


def _make_reviews(n: int = 400, seed: int = 0) -> list[tuple[int, str]]:
    """Short synthetic Korean restaurant reviews, unique, with ratings 0/1/2."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        text = f"{rng.choice(_SUBJ)} {rng.choice(_FOOD)} {rng.choice(_VERB)}{rng.choice(_TAIL)}"
        if rng.random() < 0.5:
            text += f" {rng.choice(_FOOD)}도 {rng.choice(_VERB)}"
        if text not in seen:
            seen.add(text)
            out.append((rng.randrange(3), text))
    return out


_HANJA = ["龍", "味", "食堂", "老鋪", "一品", "飯店"]
_EMOJI = ["🍜", "🔥", "👍", "😋", "🥟"]


@pytest.fixture(scope="session")
def train_tiny(write_parquet):
    """train_tiny(root, rows, *overrides, run="run") trains experiment=smoke (fp32, no periodic evaluation) on `rows`
    written as root/kr3.parquet, with root as the project folder; returns the run folder root/<run>."""
    def train(root: Path, rows, *overrides, run: str = "run") -> Path:
        from kr3.stages import train as stage

        src = write_parquet(root / "kr3.parquet", rows)
        stage.run(compose(["data=local", f"data.path={src}", "experiment=smoke", "trainer.precision=fp32",
                           "trainer.eval_interval=0", *overrides, f"paths.output_dir={root / run}"], root))
        return root / run

    return train


@pytest.fixture(scope="session")
def trained(tmp_path_factory, train_tiny):
    """A tiny model trained in seconds on 21,000 synthetic reviews, a tenth of them with Hanja, ㅋ and an emoji, so its
    val split holds 1,000+ reviews with all three: (run folder, project folder). Shared by the generate, API and export
    tests."""
    root = tmp_path_factory.mktemp("trained")
    rng = random.Random(3)
    rows = [(r, f"{t} {rng.choice(_HANJA)} {'ㅋ' * rng.randrange(1, 6)} {rng.choice(_EMOJI)}" if rng.random() < 0.1 else t)
            for r, t in _make_reviews(21000, seed=2)]
    run = train_tiny(root, rows, "tokenizer.vocab_size=500", "trainer.max_steps=150", "trainer.lr=3e-3",
                     "trainer.warmup_steps=10", run="outputs/a/b")
    return run, root


@pytest.fixture(scope="session")
def make_reviews():
    """make_reviews(n, seed) → [(rating, text)]: unique synthetic reviews."""
    return _make_reviews


@pytest.fixture(scope="session")
def write_parquet():
    """write_parquet(path, rows) writes [(rating, text)] as a KR3-shaped parquet file and returns its path."""
    def write(path: Path, rows) -> Path:
        import pandas as pd

        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"Rating": [r for r, _ in rows], "Review": [t for _, t in rows]}).to_parquet(path)
        return path

    return write


@pytest.fixture
def reviews():
    return _make_reviews()


@pytest.fixture
def corpus_parquet(tmp_path, reviews):
    """A KR3-shaped parquet file (Rating, Review, and the stray __index_level_0__) with rows cleaning must fix
    or drop: extra spaces, NFD, empty, too short, a control character, and a duplicate."""
    import pandas as pd

    dirty = [(1, "  공백이   많은    리뷰   "), (1, unicodedata.normalize("NFD", "자모로 분해된 리뷰")),
             (0, ""), (0, "ㅋ"), (1, "제어\x07문자")]
    rows = [*reviews, *dirty, reviews[0]]
    df = pd.DataFrame({"Rating": [r for r, _ in rows], "Review": [t for _, t in rows]})
    df.index = range(1000, 1000 + len(df))
    path = tmp_path / "src" / "kr3.parquet"
    path.parent.mkdir()
    df.to_parquet(path, index=True)  # writes __index_level_0__, as KR3's file has
    return path


@pytest.fixture
def local_cfg(tmp_path, corpus_parquet):
    """local_cfg(*overrides): a config reading corpus_parquet with a small SentencePiece vocabulary."""
    def make(*overrides):
        return compose(["data=local", f"data.path={corpus_parquet}", "tokenizer.vocab_size=400", *overrides], tmp_path)

    return make


def _shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared exists only in this project's workplace)")
    return path


@pytest.fixture
def nsmc() -> Path:
    """676k real Korean reviews in KR3's schema."""
    return _shared("data/nsmc_reviews.parquet")


@pytest.fixture
def kogpt2() -> Path:
    """A real pretrained Korean tokenizer folder (tokenizer.json)."""
    return _shared("tokenizers/kogpt2-v1")


# Tiers: `pytest -m "not e2e"` is the fast one (unit tests, under a minute); e2e tests start processes, servers, torchrun
# or the browser, read the 676k reviews of ../shared, or use a model trained beyond a few steps — these fixtures':
TRAINED_BEYOND_A_FEW_STEPS = {"trained", "served_run", "rated_run", "conditioned", "nsmc"}


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`, the default): one thread per worker and per process it starts, so that two
    workers share two cores instead of fighting over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED_BEYOND_A_FEW_STEPS & set(item.fixturenames) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.e2e)


def pytest_report_header(config):
    import torch

    from kr3 import hardware

    cpu = torch.backends.cpu.get_cpu_capability()
    return f"kr3: precision=auto resolves to {hardware.resolve_precision('auto', torch.device('cpu'))} on this CPU ({cpu})"


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, make_reviews, train_tiny):
    """A tiny model trained for a few seconds on synthetic reviews, for the stage=serve tests: its run folder."""
    return train_tiny(tmp_path_factory.mktemp("served"), make_reviews(3000, seed=2), "tokenizer.vocab_size=500",
                      "trainer.max_steps=80", "trainer.lr=3e-3", "trainer.warmup_steps=10")


@pytest.fixture(scope="session")
def rated_run(tmp_path_factory, make_reviews, train_tiny):
    """A tiny model trained with data.condition=rating (briefly: the tests ask only that a rating reaches it): its
    run folder."""
    return train_tiny(tmp_path_factory.mktemp("rated"), make_reviews(1500, seed=3), "tokenizer.vocab_size=400",
                      "data.condition=rating", "trainer.max_steps=30")


@pytest.fixture
def live_server():
    """live_server(app) serves an ASGI app with uvicorn on 127.0.0.1 (a free port) in a thread until the test ends;
    returns its base URL."""
    import threading
    import time

    import uvicorn

    from kr3 import serve

    running = []

    def start(app) -> str:
        sock = serve.listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        return serve.url(sock).rstrip("/")

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def as_if_in_a_process_of_its_own():
    """What a run of run.py leaves in its process, taken back: Hydra's config of the job, its logging setup and
    torch's thread count (trainer.threads)."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    def loggers():
        return [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]

    saved = {x: (x.handlers[:], x.level, x.disabled, x.propagate) for x in loggers()}
    raise_exceptions, threads = logging.raiseExceptions, torch.get_num_threads()
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None
        logging.raiseExceptions = raise_exceptions
        torch.set_num_threads(threads)
        for x in loggers():
            handlers, level, x.disabled, x.propagate = saved.get(x, ([], logging.NOTSET, False, True))
            for handler in set(x.handlers) - set(handlers):
                handler.close()
            x.handlers[:] = handlers
            x.setLevel(level)


_RUN_TIMES = itertools.count(int(time.time()) - 10**6, 2)  # each in-process command its own second: its own run folder


@pytest.fixture(scope="session")
def run_kr3():
    """run_kr3(*args, stdin="", cwd=None, env=None) runs `python run.py *args` in this process — as run.py does, without
    the seconds a new Python takes to import torch — and returns its exit status, stdout and stderr as a
    subprocess.CompletedProcess. stdin may be bytes (a line that is not UTF-8)."""
    from kr3 import cli

    def run(*args, stdin: str | bytes = "", cwd=None, env=None) -> subprocess.CompletedProcess:
        out, err = io.StringIO(), io.StringIO()
        data = stdin.encode() if isinstance(stdin, str) else stdin
        with pytest.MonkeyPatch.context() as m, as_if_in_a_process_of_its_own(), redirect_stdout(out), redirect_stderr(err):
            m.setenv("KR3_RUN_TIME", repr(float(next(_RUN_TIMES))))
            for name, value in (env or {}).items():
                m.setenv(name, value)
            if cwd:
                m.chdir(cwd)
            m.setattr(sys, "argv", ["run.py", *map(str, args)])
            m.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        return subprocess.CompletedProcess(["run.py", *args], code, out.getvalue(), err.getvalue())

    return run
