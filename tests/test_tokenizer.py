import json
import subprocess
import sys

import pytest

from kr3 import tokenizer as ktok
from kr3.config import ROOT, compose
from kr3.errors import UserError


def sp_cfg(tmp_path, *overrides):
    return compose(root=tmp_path, overrides=["tokenizer=sentencepiece", *overrides]).tokenizer


@pytest.fixture
def texts(reviews):
    return [t for _, t in reviews]


def test_sentencepiece_round_trip_and_reload(tmp_path, texts):
    tok = ktok.build(sp_cfg(tmp_path, "tokenizer.vocab_size=400"), texts, seed=0)
    assert tok.vocab_size == 400 and tok.eos_id == 2
    for t in [*texts[:50], "처음 보는 글자 龍 🍜"]:  # unseen characters go through byte fallback
        ids = tok.encode(t)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == t
    tok.save(tmp_path / "tok")
    again = ktok.load(tmp_path / "tok")
    assert again.encode_batch(texts[:20]) == tok.encode_batch(texts[:20])
    assert (again.vocab_size, again.eos_id) == (400, 2)


@pytest.mark.e2e
def test_sentencepiece_is_deterministic_across_processes(tmp_path, make_reviews):
    """Sampling included (input_sentence_size < corpus): a new process must train the same model."""
    (tmp_path / "texts.json").write_text(json.dumps([t for _, t in make_reviews(800)]))
    code = (
        "import hashlib, json; from kr3 import tokenizer as k; from kr3.config import compose;"
        f"cfg = compose(['tokenizer.vocab_size=380', 'tokenizer.input_sentence_size=300'], {str(tmp_path)!r});"
        f"texts = json.loads(open({str(tmp_path / 'texts.json')!r}).read());"
        "print(hashlib.md5(k.build(cfg.tokenizer, texts, seed=1).proto).hexdigest())"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout


def test_unigram(tmp_path, texts):
    tok = ktok.build(sp_cfg(tmp_path, "tokenizer.vocab_size=370", "tokenizer.model_type=unigram"), texts, seed=0)
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_vocab_too_small_for_byte_fallback(tmp_path, texts):
    with pytest.raises(UserError, match="too small for byte fallback"):
        ktok.build(sp_cfg(tmp_path, "tokenizer.vocab_size=200"), texts, seed=0)


def test_vocab_beyond_the_token_files(tmp_path, texts):
    with pytest.raises(UserError, match=r"tokenizer.vocab_size=300000 is unreasonably large — use at most 262140"):
        ktok.build(sp_cfg(tmp_path, "tokenizer.vocab_size=300000"), texts, seed=0)


def test_vocab_larger_than_corpus_supports(tmp_path, texts):
    with pytest.raises(UserError, match=r"larger than this corpus supports \(at most \d+\)"):
        ktok.build(sp_cfg(tmp_path, "tokenizer.vocab_size=8000"), texts, seed=0)


@pytest.mark.parametrize("override", ["tokenizer.character_coverage=2", "tokenizer.model_type=foo"])
def test_settings_sentencepiece_refuses(tmp_path, texts, override):
    with pytest.raises(UserError, match=r"sentencepiece refused these settings \(.+\) — check the tokenizer"):
        ktok.build(sp_cfg(tmp_path, "tokenizer.vocab_size=400", override), texts, seed=0)


def test_pretrained_folder_without_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = compose(root=tmp_path, overrides=["tokenizer=pretrained", f"tokenizer.name_or_path={tmp_path / 'empty'}"]).tokenizer
    with pytest.raises(UserError, match="has no tokenizer.json"):
        ktok.build(cfg, [], seed=0)


def test_pretrained_hub_unreachable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose(root=tmp_path, overrides=["tokenizer=pretrained"]).tokenizer
    with pytest.raises(UserError, match=r"could not download tokenizer skt/kogpt2-base-v2 .*tokenizer.name_or_path="):
        ktok.build(cfg, [], seed=0, cache_dir=str(tmp_path / "hf"))


def test_load_without_saved_tokenizer(tmp_path):
    with pytest.raises(UserError, match="run stage=prepare first"):
        ktok.load(tmp_path)


def test_pretrained_kogpt2_from_local_folder(tmp_path, texts, kogpt2):
    cfg = compose(root=tmp_path, overrides=["tokenizer=pretrained", f"tokenizer.name_or_path={kogpt2}"]).tokenizer
    tok = ktok.build(cfg, [], seed=0)
    assert tok.vocab_size > 50_000
    assert tok.id_to_piece(tok.eos_id) == "</s>"
    ids = tok.encode("이 집 짜장면은 정말 맛있어요")
    assert tok.decode(ids) == "이 집 짜장면은 정말 맛있어요"
    tok.save(tmp_path / "tok")
    again = ktok.load(tmp_path / "tok")
    assert again.encode_batch(texts[:20]) == tok.encode_batch(texts[:20])
    assert again.eos_id == tok.eos_id
