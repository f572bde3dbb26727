import unicodedata

import pandas as pd
import pytest
from omegaconf import OmegaConf

from kr3 import data
from kr3.config import compose
from kr3.errors import UserError


def data_cfg(tmp_path, *overrides):
    return compose(root=tmp_path, overrides=list(overrides)).data


def test_clean_text_normalizes():
    nfd = unicodedata.normalize("NFD", "맛집")
    assert nfd != "맛집"
    assert data.clean_text(nfd) == "맛집"
    assert data.clean_text("  a\t\tb \n c\x07\u200b ") == "a b c"


def test_clean_counts_each_step(tmp_path):
    cfg = data_cfg(tmp_path, "data.clean.max_chars=10")
    corpus = data.Corpus(["좋아요", "좋아요", "", "x", "아주 아주 아주 긴 리뷰입니다", "  맛집  "], [1, 1, 0, 2, 1, 0], "t", "f")
    out = data.clean(corpus, cfg)
    assert out.texts == ["좋아요", "맛집"]
    assert out.labels == [1, 0]
    assert out.counts == {"loaded": 6, "empty": 1, "too_short": 1, "too_long": 1, "duplicates": 1, "kept": 2}


def test_clean_rating_filter(tmp_path):
    cfg = data_cfg(tmp_path, "data.ratings=[0,1]")
    out = data.clean(data.Corpus(["좋아요", "별로", "글쎄요"], [1, 0, 2], "t", "f"), cfg)
    assert out.texts == ["좋아요", "별로"]
    assert out.counts["rating_filtered"] == 1


def test_clean_nothing_left(tmp_path):
    with pytest.raises(UserError, match="no reviews left after cleaning"):
        data.clean(data.Corpus(["", " ", "x"], None, "t", "f"), data_cfg(tmp_path))


def test_split_is_deterministic_and_disjoint(reviews):
    corpus = data.Corpus([t for _, t in reviews], [r for r, _ in reviews], "t", "f")
    a = data.split(corpus, 0.1, 0.05, seed=3)
    b = data.split(corpus, 0.1, 0.05, seed=3)
    c = data.split(corpus, 0.1, 0.05, seed=4)
    assert a["val"].texts == b["val"].texts and a["val"].texts != c["val"].texts
    assert len(a["val"].texts) == 40 and len(a["test"].texts) == 20 and len(a["train"].texts) == 340
    sets = [set(a[k].texts) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == len(reviews)
    assert len(data.split(corpus, 0.1, 0.001, seed=3)["test"].texts) == 1  # asked for, never rounded away


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_split_rejects_bad_val_ratio(ratio):
    with pytest.raises(UserError, match=r"data.val_ratio=.* must be between 0 and 1"):
        data.split(data.Corpus(["a", "b"], None, "t", "f"), ratio, 0, seed=0)


# ---------------------------------------------------------------- loading


def write(path, reviews, fmt):
    df = pd.DataFrame({"Rating": [r for r, _ in reviews], "Review": [t for _, t in reviews]})
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "txt":
        path.write_text("\n".join(t for _, t in reviews) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "txt"])
def test_load_local_formats(tmp_path, reviews, fmt):
    path = write(tmp_path / f"kr3.{fmt}", reviews[:50], fmt)
    corpus = data.load(data_cfg(tmp_path, "data=local", f"data.path={path}"))
    assert corpus.texts == [t for _, t in reviews[:50]]
    if fmt != "txt":
        assert corpus.labels == [r for r, _ in reviews[:50]]


def test_load_local_folder(tmp_path, reviews):
    write(tmp_path / "d" / "a.parquet", reviews[:30], "parquet")
    write(tmp_path / "d" / "b.parquet", reviews[30:50], "parquet")
    corpus = data.load(data_cfg(tmp_path, "data=local", f"data.path={tmp_path / 'd'}"))
    assert sorted(corpus.texts) == sorted(t for _, t in reviews[:50])


def test_load_local_folder_skips_hidden_files_and_folders(tmp_path, reviews):
    write(tmp_path / "d" / "a.csv", reviews[:30], "csv")
    write(tmp_path / "d" / ".ipynb_checkpoints" / "a-checkpoint.csv", reviews[30:50], "csv")
    (tmp_path / "d" / ".git").mkdir()
    (tmp_path / "d" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    corpus = data.load(data_cfg(tmp_path, "data=local", f"data.path={tmp_path / 'd'}"))
    assert sorted(corpus.texts) == sorted(t for _, t in reviews[:30])
    (tmp_path / "d" / "README").write_text("about these files\n")
    with pytest.raises(UserError, match=r"unsupported file type \(a file without extension\)"):
        data.load(data_cfg(tmp_path, "data=local", f"data.path={tmp_path / 'd'}"))


@pytest.mark.parametrize("labels, expected", [(["pos", "neg"], None), ([1.5, 2.0], None), ([2.0, None], [2, -1]),
                                              (["2", " NA"], [2, -1])])
def test_ratings_are_integers_or_not_ratings(tmp_path, labels, expected):
    """A rating column of other values is no rating column: fine unless data.ratings filters on it."""
    path = tmp_path / "r.parquet"
    pd.DataFrame({"Rating": labels, "Review": ["맛있어요", "별로예요"]}).to_parquet(path)
    assert data.load(data_cfg(tmp_path, "data=local", f"data.path={path}")).labels == expected
    if expected is None:
        with pytest.raises(UserError, match=r"data.ratings filters on 'Rating', which in .* is not integer ratings"):
            data.load(data_cfg(tmp_path, "data=local", f"data.path={path}", "data.ratings=[1]"))


def test_csv_reviews_reading_na_are_reviews(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("Rating,Review\n1,NA\n0,null\n2,None\n1,\n", encoding="utf-8")
    assert data.load(data_cfg(tmp_path, "data=local", f"data.path={path}")).texts == ["NA", "null", "None", ""]


def test_load_drops_index_column_and_fingerprints_content(tmp_path, corpus_parquet):
    cfg = data_cfg(tmp_path, "data=local", f"data.path={corpus_parquet}")
    a = data.load(cfg)
    assert len(a.texts) == 406
    with pytest.raises(UserError, match=r"\(columns: Rating, Review\)"):  # the pandas index is no column of reviews
        data.load(data_cfg(tmp_path, "data=local", f"data.path={corpus_parquet}", "data.text_column=nothing"))
    df = pd.read_parquet(corpus_parquet).iloc[:-1]
    df.to_parquet(corpus_parquet)
    assert data.load(cfg).fingerprint != a.fingerprint


def test_hub_path_through_load_dataset_on_a_local_dataset_folder(tmp_path, reviews):
    """data=kr3 calls datasets.load_dataset(hub_id); a folder in the Hub repo's layout takes the same path."""
    repo = tmp_path / "KR3"
    write(repo / "data" / "train-00000-of-00001.parquet", reviews[:60], "parquet")
    corpus = data.load(data_cfg(tmp_path, f"data.hub_id={repo}"))
    assert corpus.texts == [t for _, t in reviews[:60]]
    assert corpus.source == f"hub:{repo}"


def test_hub_unreachable_says_what_to_do(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # what HF_HUB_OFFLINE=1 sets at import time; these machines have no Hub either way, this just skips the timeouts
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"could not download leey4n/KR3 .*data=local data.path="):
        data.load(data_cfg(tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load(data_cfg(tmp_path, "data=local", f"data.path={tmp_path / 'nope.parquet'}"))


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="data=local needs a file"):
        data.load(data_cfg(tmp_path, "data=local"))


def test_unsupported_extension(tmp_path):
    (tmp_path / "r.xlsx").write_bytes(b"x")
    with pytest.raises(UserError, match=r"unsupported file type \(\.xlsx\)"):
        data.load(data_cfg(tmp_path, "data=local", f"data.path={tmp_path / 'r.xlsx'}"))


def test_missing_column_lists_columns(tmp_path, reviews):
    path = write(tmp_path / "r.csv", reviews[:5], "csv")
    with pytest.raises(UserError, match=r"no column 'text' \(columns: Rating, Review\)"):
        data.load(data_cfg(tmp_path, "data=local", f"data.path={path}", "data.text_column=text"))


def test_rating_filter_without_label_column(tmp_path, reviews):
    path = write(tmp_path / "r.txt", reviews[:5], "txt")
    with pytest.raises(UserError, match="data.ratings filters on 'Rating'"):
        data.load(data_cfg(tmp_path, "data=local", f"data.path={path}", "data.ratings=[1]"))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes("Rating\tReview\n1\t맛있어요\n0\t".encode() + "별로".encode("euc-kr") + b"\n")
    with pytest.raises(UserError, match=r"not valid UTF-8 \(line 3"):
        data.load(data_cfg(tmp_path, "data=local", f"data.path={path}"))


def test_real_corpus_loads_with_no_options(tmp_path, nsmc):
    cfg = data_cfg(tmp_path, "data=local", f"data.path={nsmc}")
    corpus = data.load(cfg)
    assert len(corpus.texts) == 675_798
    assert set(corpus.labels) == {0, 1, 2}
    assert OmegaConf.select(cfg, "text_column") == "Review"


def test_mixed_file_types(tmp_path, reviews):
    write(tmp_path / "d" / "a.parquet", reviews[:5], "parquet")
    write(tmp_path / "d" / "b.csv", reviews[5:10], "csv")
    with pytest.raises(UserError, match="mixes file types"):
        data.load(data_cfg(tmp_path, "data=local", f"data.path={tmp_path / 'd'}"))


def test_malformed_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="could not read .* as parquet"):
        data.load(data_cfg(tmp_path, "data=local", f"data.path={tmp_path / 'bad.parquet'}"))
