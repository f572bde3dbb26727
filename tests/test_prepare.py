import json
import logging

import numpy as np
import pytest

from kr3 import prepared, ratings
from kr3 import tokenizer as ktok
from kr3.config import compose
from kr3.errors import UserError


def read_json(path):
    return json.loads(path.read_text())


def leftovers(data_dir):
    return [p.name for p in data_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_prepare_end_to_end(local_cfg, reviews, caplog):
    cfg = local_cfg()
    out = prepared.ensure(cfg)
    assert out.parent == prepared.prepared_dir(cfg).parent and out.name.startswith("local-spbpe400-")
    meta = read_json(out / "meta.json")
    assert meta["format_version"] == prepared.FORMAT_VERSION
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    # 400 clean reviews + 5 dirty ones (2 fixed, 3 dropped) + 1 duplicate
    c = meta["cleaning"]
    assert (c["loaded"], c["empty"], c["too_short"], c["duplicates"], c["kept"]) == (406, 1, 1, 1, 403)
    tok = ktok.load(out / "tokenizer")
    texts = []
    for split in ("train", "val"):
        s = meta["splits"][split]
        ids = np.fromfile(out / s["file"], dtype=np.uint16)
        assert len(ids) == s["tokens"]
        assert (ids == tok.eos_id).sum() == s["reviews"]  # one EOS closes every review
        assert ids[-1] == tok.eos_id
        docs = np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1)[:-1]
        split_texts = [tok.decode(d[:-1].tolist()) for d in docs]
        assert sum(map(len, split_texts)) == s["chars"]
        texts += split_texts
    assert meta["splits"]["val"]["reviews"] == round(403 * 0.05)
    assert sorted(texts) == sorted({t for _, t in reviews} | {"공백이 많은 리뷰", "자모로 분해된 리뷰", "제어문자"})
    assert meta["round_trip"] == 1.0
    assert "come back exactly" not in caplog.text
    assert not leftovers(out.parent)


def test_prepare_reuses_then_force_redoes(local_cfg, caplog):
    caplog.set_level(logging.INFO)
    out = prepared.ensure(local_cfg())
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert prepared.ensure(local_cfg()) == out
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    assert "up to date" in caplog.text
    prepared.ensure(local_cfg("prepare.force=true"))
    assert (out / "meta.json").stat().st_mtime_ns != mtime


def test_prepare_redoes_when_source_changes(local_cfg, corpus_parquet):
    import pandas as pd

    out = prepared.ensure(local_cfg())
    df = pd.read_parquet(corpus_parquet).iloc[:300]
    df.to_parquet(corpus_parquet)
    assert prepared.ensure(local_cfg()) == out
    assert read_json(out / "meta.json")["cleaning"]["loaded"] == 300


def test_a_local_dataset_folder_as_hub_id_is_watched_too(tmp_path, corpus_parquet):
    cfg = compose(root=tmp_path, overrides=[f"data.hub_id={corpus_parquet.parent}"]).data
    before = prepared.source_stamp(cfg)
    corpus_parquet.write_bytes(corpus_parquet.read_bytes() + b"x")
    assert prepared.source_stamp(cfg) != before


@pytest.mark.e2e
def test_different_config_gets_a_different_folder(local_cfg):
    a = prepared.prepared_dir(local_cfg())
    assert prepared.prepared_dir(local_cfg("data.val_ratio=0.1")) != a
    assert prepared.prepared_dir(local_cfg("tokenizer.vocab_size=500")) != a
    assert prepared.prepared_dir(local_cfg("prepare.force=true")) == a


@pytest.mark.e2e
def test_killed_prepare_leaves_nothing_half_written(local_cfg, monkeypatch):
    cfg = local_cfg()
    out = prepared.ensure(cfg)
    before = (out / "train.bin").read_bytes()

    def die(*a, **k):
        raise KeyboardInterrupt  # what Ctrl-C or a kill between encode and meta.json looks like

    monkeypatch.setattr(prepared, "_round_trip", die)
    with pytest.raises(KeyboardInterrupt):
        prepared.ensure(local_cfg("prepare.force=true"))
    assert (out / "train.bin").read_bytes() == before  # the old, complete folder is untouched
    assert not leftovers(out.parent)
    other = prepared.prepared_dir(local_cfg("data.val_ratio=0.2"))
    with pytest.raises(KeyboardInterrupt):
        prepared.ensure(local_cfg("data.val_ratio=0.2"))
    assert not other.exists()


def test_test_split_and_rating_filter(local_cfg):
    out = prepared.ensure(local_cfg("data.test_ratio=0.1", "data.ratings=[0,1]"))
    meta = read_json(out / "meta.json")
    assert set(meta["splits"]) == {"train", "val", "test"}
    assert meta["cleaning"]["rating_filtered"] > 100
    assert (out / "test.bin").exists()


def test_nothing_written_on_bad_input(tmp_path):
    cfg = compose(root=tmp_path, overrides=["data=local", f"data.path={tmp_path / 'missing.parquet'}"])
    with pytest.raises(UserError):
        prepared.ensure(cfg)
    assert not (tmp_path / "data").exists()


def test_prepare_with_pretrained_tokenizer(tmp_path, corpus_parquet, kogpt2, caplog):
    cfg = compose(root=tmp_path, overrides=["data=local", f"data.path={corpus_parquet}", "tokenizer=pretrained",
                                 f"tokenizer.name_or_path={kogpt2}"])
    out = prepared.ensure(cfg)
    meta = read_json(out / "meta.json")
    assert out.name.startswith("local-kogpt2-v1-")
    assert meta["tokenizer"]["kind"] == "pretrained" and meta["dtype"] == "uint16"
    tok = ktok.load(out / "tokenizer")
    ids = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert (ids == tok.eos_id).sum() == meta["splits"]["val"]["reviews"]
    assert 0.3 < meta["round_trip"] < 1  # NFKC turns ㅋ into ᄏ: reviews with ㅋㅋ do not come back exactly
    [warning] = [r.getMessage() for r in caplog.records if r.name == "kr3.prepared" and r.levelno == logging.WARNING]
    assert f"{meta['round_trip']:.1%}" in warning and "NFKC turns ㅋ into ᄏ" in warning
    assert "tokenizer=sentencepiece" in warning and "identity normalization" in warning


def test_prepare_real_corpus_subset(tmp_path, nsmc):
    cfg = compose(root=tmp_path, overrides=["data=local", f"data.path={nsmc}", "data.ratings=[0]", "tokenizer.vocab_size=2000"])
    meta = read_json(prepared.ensure(cfg) / "meta.json")
    assert meta["cleaning"]["kept"] > 100_000
    assert meta["round_trip"] > 0.999
    assert 1 < meta["splits"]["val"]["chars_per_token"] < 4


def test_rating_condition_puts_a_control_token_before_each_rated_review(tmp_path, reviews, write_parquet):
    rows = [*reviews[:300], *((None, t) for _, t in reviews[300:])]  # the last 100 have no rating
    src = write_parquet(tmp_path / "rated.parquet", rows)
    cfg = compose(["data=local", f"data.path={src}", "tokenizer.vocab_size=400", "data.condition=rating"], tmp_path)
    out = prepared.ensure(cfg)
    meta = read_json(out / "meta.json")
    controls = {int(r): i for r, i in meta["condition"]["controls"].items()}
    assert sorted(controls) == [0, 1, 2] and len(set(controls.values())) == 3
    tok = ktok.load(out / "tokenizer")
    assert all(tok.decode(tok.encode(piece)) == piece for piece in ratings.PIECES.values())
    rating_of = {t: r for r, t in rows}
    ids = np.fromfile(out / "train.bin", dtype=np.uint16)
    docs = np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1)[:-1]
    by_id = {i: r for r, i in controls.items()}
    for doc in docs:
        head = int(doc[0])
        text = tok.decode(doc[1:-1].tolist() if head in by_id else doc[:-1].tolist())
        assert by_id.get(head) == rating_of[text]  # its own rating's token, or none when it has no rating
    assert sum(meta["splits"]["train"]["ratings"].values()) < meta["splits"]["train"]["reviews"]


def test_rating_condition_needs_ratings_and_keeps_unconditioned_names(tmp_path, local_cfg):
    from omegaconf import OmegaConf

    cfg = local_cfg()
    plain = OmegaConf.create(OmegaConf.to_container(cfg))  # untyped: a config from before data.condition
    del plain.data["condition"]
    assert prepared.dataset_name(cfg) == prepared.dataset_name(plain)  # folders prepared before keep theirs
    with pytest.raises(UserError, match="data.condition=rating needs ratings"):
        prepared.ensure(local_cfg("data.condition=rating", "data.label_column=nothing"))


def test_rating_condition_adds_special_tokens_to_a_pretrained_tokenizer(tmp_path, corpus_parquet, kogpt2):
    cfg = compose(["data=local", f"data.path={corpus_parquet}", "tokenizer=pretrained", f"tokenizer.name_or_path={kogpt2}",
                   "data.condition=rating"], tmp_path)
    meta = read_json(prepared.ensure(cfg) / "meta.json")
    plain = ktok.PretrainedTokenizer(kogpt2)
    assert meta["vocab_size"] == plain.vocab_size + 3
    assert sorted(meta["condition"]["controls"].values()) == list(range(plain.vocab_size, plain.vocab_size + 3))
