import json
import random
import unicodedata
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kr3.config import CONFIG_DIR, register_resolvers

SHARED = Path(__file__).resolve().parents[2] / "shared"
NSMC = SHARED / "data" / "nsmc_reviews.parquet"
KOGPT2 = SHARED / "tokenizers" / "kogpt2-v1"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared is absent")

register_resolvers()

_SUBJ = ["이 집", "여기", "우리 동네 식당", "사장님", "이 가게", "저희 가족", "친구랑 간 곳", "점심 식당"]
_FOOD = ["짜장면", "김치찌개", "떡볶이", "삼겹살", "비빔밥", "냉면", "치킨", "파스타", "커피", "국밥"]
_VERB = ["정말 맛있어요", "너무 짜요", "양이 많아요", "가격이 착해요", "별로였어요", "또 올게요", "친절해요",
         "다시는 안 가요", "최고입니다", "그냥 그래요", "웨이팅이 길어요", "분위기가 좋아요"]
_TAIL = ["", "!", "!!", " ㅋㅋ", " ㅠㅠ", ".", " 추천합니다", " 😋", " 강추"]


def make_reviews(n: int = 400, seed: int = 0) -> list[tuple[int, str]]:
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


@pytest.fixture
def reviews():
    return make_reviews()


# rows cleaning must fix or drop: (rating, text)
DIRTY = [(1, "  공백이   많은    리뷰   "), (1, unicodedata.normalize("NFD", "자모로 분해된 리뷰")),
         (0, ""), (0, "ㅋ"), (1, "제어\x07문자")]


@pytest.fixture
def corpus_parquet(tmp_path, reviews):
    """A KR3-shaped parquet file (Rating, Review, and the stray __index_level_0__), with a few dirty rows."""
    import pandas as pd

    rows = [*reviews, *DIRTY, reviews[0]]  # the last one is a duplicate
    df = pd.DataFrame({"Rating": [r for r, _ in rows], "Review": [t for _, t in rows]})
    df.index = range(1000, 1000 + len(df))
    path = tmp_path / "src" / "kr3.parquet"
    path.parent.mkdir()
    df.to_parquet(path, index=True)  # writes __index_level_0__, as KR3's file has
    return path


def compose_cfg(tmp_path: Path, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"paths.root_dir={tmp_path}", *overrides],
        )


SMALL_TOKENIZER = ["tokenizer.vocab_size=400"]


@pytest.fixture
def local_cfg(tmp_path, corpus_parquet):
    def make(*overrides):
        return compose_cfg(tmp_path, ["data=local", f"data.path={corpus_parquet}", *SMALL_TOKENIZER, *overrides])

    return make


def read_json(path):
    return json.loads(Path(path).read_text())
