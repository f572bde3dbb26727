"""User-facing error paths added by train/generate/evaluate that other tests do not feed."""
import re
from dataclasses import replace

import pytest

from kr3 import checkpoint, data, prepared, settings
from kr3 import tokenizer as ktok
from kr3.config import compose
from kr3.errors import UserError


def test_test_ratio_out_of_range():
    with pytest.raises(UserError, match=r"data.test_ratio=0.6 must be in \[0, 1\)"):
        data.split(data.Corpus(["a", "b", "c"], None, "t", "f"), 0.5, 0.6, seed=0)


def test_vocab_smaller_than_required_characters(tmp_path):
    texts = ["".join(chr(0xAC00 + i + j) for j in range(20)) for i in range(0, 2000, 20)]  # 2,000 distinct syllables
    cfg = compose(root=tmp_path, overrides=["tokenizer.vocab_size=600", "tokenizer.character_coverage=1.0"]).tokenizer
    with pytest.raises(UserError, match=r"smaller than the \d+ pieces this corpus needs"):
        ktok.build(cfg, texts, seed=0)


def test_pretrained_without_eos(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="has no end-of-text token"):
        ktok.PretrainedTokenizer(tmp_path)


def test_saved_tokenizer_that_does_not_match_its_spec(tmp_path, reviews):
    cfg = compose(root=tmp_path, overrides=["tokenizer.vocab_size=400"]).tokenizer
    ktok.build(cfg, [t for _, t in reviews], seed=0).save(tmp_path / "tok")
    (tmp_path / "tok" / ktok.SPEC_FILE).write_text('{"kind": "sentencepiece", "vocab_size": 999, "eos_id": 2}')
    with pytest.raises(UserError, match="does not match its kr3_tokenizer.json"):
        ktok.load(tmp_path / "tok")


def test_prepared_meta_of_another_version(tmp_path):
    (tmp_path / "meta.json").write_text('{"format_version": 99}')
    with pytest.raises(UserError, match="format_version 99"):
        prepared.read_meta(tmp_path)
    with pytest.raises(UserError, match="no prepared data in"):
        prepared.read_meta(tmp_path / "nothing")


def test_train_split_too_small_for_one_step(tmp_path, make_reviews, write_parquet):
    from kr3.stages import train

    write_parquet(tmp_path / "r.parquet", make_reviews(60))
    cfg = compose(root=tmp_path, overrides=["data=local", f"data.path={tmp_path / 'r.parquet'}", "tokenizer.vocab_size=380",
                                 "experiment=smoke", "trainer.batch_size=512",
                                 f"paths.output_dir={tmp_path / 'run'}", "stage=train"])
    with pytest.raises(UserError, match="not one step of 512 windows"):
        train.run(cfg)


def test_latest_without_runs(tmp_path):
    with pytest.raises(UserError, match="checkpoint=latest found no checkpoints"):
        checkpoint.locate("latest", tmp_path)


def _fake_checkpoint(tmp_path):
    from kr3.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=300, n_layers=1, n_heads=1, d_model=8, d_ffn=8, block_size=8))
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    checkpoint.save(checkpoint.Checkpoint(model_config=model.cfg.to_dict(), model=model.state_dict(), step=0,
                                          config={"data": {"clean": {}}}, tokenizer=checkpoint.TokenizerRecord(),
                                          data=checkpoint.DataRecord(dir=str(tmp_path / "gone"), splits={}, dtype="uint16")),
                    path)
    return path


def test_evaluate_split_that_is_gone(tmp_path, monkeypatch):
    from kr3.stages import evaluate

    path = _fake_checkpoint(tmp_path)
    monkeypatch.setattr(ktok, "from_files", lambda files: None)
    cfg = compose(root=tmp_path, overrides=["stage=evaluate", f"checkpoint={path}", f"paths.output_dir={tmp_path / 'e'}"])
    with pytest.raises(UserError, match=r"split 'val' of .* is not there"):
        evaluate.run(cfg)


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"\n  \n", "has no prompts"),
                                              (b"\xff\xfe\x00a\n", "is not UTF-8 text — save it as UTF-8"),
                                              ("folder", "is a folder — give a text file with one prompt per line")])
def test_prompts_file_errors(tmp_path, content, message):
    from kr3.stages import generate

    prompts = tmp_path / "prompts.txt"
    if content == "folder":
        prompts.mkdir()
    elif content is not None:
        prompts.write_bytes(content)
    cfg = compose(root=tmp_path, overrides=["stage=generate", f"generate.prompts_file={prompts}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UserError, match=message):
        generate.batch(cfg, None)
    assert not (tmp_path / "generations.jsonl").exists()


def test_evaluate_refuses_data_prepared_again(tmp_path, monkeypatch):
    """The checkpoint's prepared folder was rebuilt (other data or tokenizer): its val.bin is not what the model
    was trained on, and its token ids may mean other pieces."""
    import json

    import numpy as np

    from kr3.stages import evaluate

    path = _fake_checkpoint(tmp_path)
    state = checkpoint.load(path)
    folder = tmp_path / "prepared"
    folder.mkdir()
    np.arange(50, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"format_version": prepared.FORMAT_VERSION, "fingerprint": "new"}))
    state.data = replace(state.data, dir=str(folder), splits={"val": {"file": "val.bin", "chars": 100}}, fingerprint="old")
    checkpoint.save(state, path)
    monkeypatch.setattr(ktok, "from_files", lambda files: None)
    cfg = compose(root=tmp_path, overrides=["stage=evaluate", f"checkpoint={path}", f"paths.output_dir={tmp_path / 'e'}"])
    with pytest.raises(UserError, match="was prepared again .* since this checkpoint was trained on it"):
        evaluate.run(cfg)
    assert not (tmp_path / "e" / "eval.json").exists()


@pytest.mark.parametrize("override, message", [
    ("evaluate.batch_size=0", "evaluate.batch_size=0 must be an integer ≥ 1"),
    ("evaluate.max_tokens=-5", "evaluate.max_tokens=-5 must be an integer ≥ 1, or null"),
])
def test_bad_evaluate_values(tmp_path, override, message):
    from kr3.stages import evaluate

    with pytest.raises(UserError, match=message):
        evaluate.run(compose(root=tmp_path, overrides=["stage=evaluate", "checkpoint=x.pt", override]))


@pytest.mark.parametrize("override, message", [
    ("tokenizer.kind=wordpiece", "tokenizer.kind='wordpiece' is not known — use one of: sentencepiece, pretrained"),
    ("data.source=s3", "data.source='s3' is not known — use one of: hub, local"),
    ("data.condition=stars", "data.condition=stars is not known — use data.condition=rating or null"),
])
def test_unknown_kinds_are_one_line(local_cfg, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        prepared.ensure(local_cfg(override))


def test_unknown_logger_is_one_line(tmp_path):
    from kr3.tracking import Tracker

    with pytest.raises(UserError, match=re.escape("logger.kind='tensorboard' is not known — use one of: none, wandb")):
        Tracker(compose(["logger.kind=tensorboard"], tmp_path), tmp_path / "run", enabled=True)


def test_bad_profile_values_are_one_line(tmp_path):
    with pytest.raises(UserError, match=re.escape("trainer.profile.steps=-1 must be an integer ≥ 0")):
        settings.typed(compose(["trainer.profile.steps=-1"], tmp_path).trainer)


def test_conditioning_on_ratings_the_corpus_lacks_is_one_line(tmp_path, reviews, write_parquet):
    """Star ratings 5–7 are no KR3 rating: data.condition=rating would prepare a folder with no control token."""
    src = write_parquet(tmp_path / "stars.parquet", [(5 + i % 3, text) for i, (_, text) in enumerate(reviews)])
    cfg = compose(["data=local", f"data.path={src}", "tokenizer.vocab_size=400", "data.condition=rating"], tmp_path)
    with pytest.raises(UserError, match=re.escape("column 'Rating' holds [5, 6, 7] — map its values to those")):
        prepared.ensure(cfg)


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be an integer ≥ 1, or null"),
    ("trainer.betas=[0.9,2]", "trainer.betas=[0.9, 2.0] must be two numbers in [0, 1)"),
    ("trainer.betas=[0.9]", "trainer.betas=[0.9] must be two numbers in [0, 1)"),
    ("trainer.lr=inf", "trainer.lr=inf must be a number ≥ 0"),
])
def test_bad_trainer_numbers_are_one_line(tmp_path, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        settings.typed(compose([override], tmp_path).trainer)


@pytest.mark.parametrize("name, content", [("empty.csv", "Rating,Review\n"), ("empty.txt", "\n  \n"), ("empty.parquet", None)])
def test_a_file_without_reviews_is_one_line(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        import pandas as pd

        pd.DataFrame({"Rating": pd.Series([], dtype=int), "Review": pd.Series([], dtype=str)}).to_parquet(path)
    else:
        path.write_text(content)
    with pytest.raises(UserError, match=re.escape(f"data.path={path} holds no reviews")):
        data.load(compose(["data=local", f"data.path={path}"], tmp_path).data)
