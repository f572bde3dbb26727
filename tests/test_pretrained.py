"""model=pretrained: a GPT-2-family checkpoint (KoGPT2's architecture) as the starting weights, fine-tuned by the same
trainer. No Hub here: tiny random GPT2LMHeadModels are saved with save_pretrained (one with ../shared's real KoGPT2
tokenizer where it is present), and the Hub's code path runs on a cache filled by hand."""

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from kr3 import checkpoint, pretrained
from kr3.config import ROOT, compose
from kr3.errors import UserError
from kr3.tokenizer import PretrainedTokenizer
from kr3.tracking import read_metrics

transformers = pytest.importorskip("transformers")

PROMPT = "이 집 짜장면은"


def save_tokenizer(texts: list[str], folder):
    """A small SentencePiece-style BPE (▁ for spaces) in transformers' files, `</s>` ending a text, as KoGPT2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>", "<unk>"]))
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))


def save_gpt2(folder, vocab_size: int, **shape) -> "transformers.GPT2LMHeadModel":
    """A random GPT2LMHeadModel in `folder` (config.json, model.safetensors), with a model card stating its licence."""
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     layer_norm_epsilon=1e-5, **shape)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-sa-4.0\nlanguage: ko\n---\n# a tiny GPT-2\n")
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_reviews, write_parquet):
    rows = make_reviews(3000, seed=11)
    folder = tmp_path_factory.mktemp("pretrained")
    return write_parquet(folder / "kr3.parquet", rows), [t for _, t in rows]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    """A tiny GPT-2 whose token table has 8 rows more than its tokenizer (as KoGPT2's 51,200 rows do), with dropout."""
    folder = tmp_path_factory.mktemp("tiny-gpt2") / "tiny-gpt2"
    save_tokenizer(corpus[1], folder)
    vocab = PretrainedTokenizer(folder).vocab_size
    save_gpt2(folder, vocab + 8, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return folder


def overrides(corpus, root, base, *more) -> list[str]:
    return [f"paths.root_dir={root}", "data=local", f"data.path={corpus[0]}", "experiment=finetune",
            f"model.name_or_path={base}", "logger=none", "trainer.precision=fp32", "trainer.sample_prompts=[]",
            "model.block_size=32", "trainer.batch_size=8", *more]


def train(corpus, root, base, *more, run="run"):
    from kr3.stages import train as stage

    cfg = compose([*overrides(corpus, root, base, *more), f"paths.output_dir={root / run}"])
    return stage.run(cfg), root / run


def imported(base, data_vocab: int | None = None, controls=()):
    cfg = compose(["model=pretrained", f"model.name_or_path={base}", "model.block_size=32"]).model
    tok = PretrainedTokenizer(base)
    return pretrained.load(cfg, base, tok, data_vocab or tok.vocab_size, controls)


def test_the_import_computes_transformers_logits(base):
    model, provenance = imported(base)
    hf = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    model.eval()
    ids = torch.randint(0, model.cfg.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    assert model.cfg.dropout == 0.1 and model.cfg.block_size == 32 and model.cfg.vocab_size == hf.config.vocab_size
    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert provenance == {"name_or_path": str(base), "folder": str(base), "hub": False, "revision": None,
                          "sha256": {"model.safetensors": digest}, "license": "cc-by-nc-sa-4.0"}


@pytest.fixture(scope="module")
def unchanged(tmp_path_factory, corpus, base):
    """The import saved by stage=train without a step's change (lr 0): a checkpoint of the original weights."""
    root = tmp_path_factory.mktemp("unchanged")
    val, run = train(corpus, root, base, "trainer.max_steps=1", "trainer.lr=0", "trainer.warmup_steps=0",
                     "model.dropout=0")
    return val, run


@pytest.mark.e2e
def test_greedy_completions_are_transformers_and_export_gives_them_back(unchanged, base, tmp_path):
    from kr3 import export, load

    _, run = unchanged
    m = load(run, device="cpu", precision="fp32", temperature=0, repetition_penalty=1.0, top_k=None, top_p=None)
    assert "fine-tuned from " + str(base) in m.describe() and m.base["license"] == "cc-by-nc-sa-4.0"
    hf = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    ids = m.tokenizer.encode(PROMPT)
    ours = m.completions(PROMPT, max_new_tokens=12)[0]
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=m.tokenizer.eos_id,
                         pad_token_id=m.tokenizer.eos_id)[0, len(ids):].tolist()
    theirs = theirs[: theirs.index(m.tokenizer.eos_id)] if m.tokenizer.eos_id in theirs else theirs
    assert ours["completion"] == m.tokenizer.decode(theirs)
    out = export.save(m, tmp_path / "hf")
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    probe = torch.randint(0, m.tokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(probe).logits - hf(probe).logits).abs().max() < 1e-4
    card = (out / "README.md").read_text()
    assert "license: cc-by-nc-sa-4.0" in card and f"## Base model\n\nFine-tuned from `{base}`: its weights" in card
    assert f"Fine-tuned from {base}, licensed `cc-by-nc-sa-4.0`: its licence applies to this model as well" in card


def test_the_card_names_a_hub_base_and_both_licences(unchanged):
    from kr3 import export, load

    m = load(unchanged[1], device="cpu", precision="fp32")
    m.checkpoint.base = {**m.base, "name_or_path": "someone/tiny-gpt2", "hub": True, "revision": "0123abcd"}
    card = export.model_card(m)
    assert "\nbase_model: someone/tiny-gpt2\n" in card and "Fine-tuned from [someone/tiny-gpt2](https://huggingface.co/" in card

    kr3_license = export.KR3_LICENSE
    assert export.card_license(True, {"license": kr3_license}) == kr3_license  # KoGPT2's licence is KR3's
    assert export.card_license(True, {"license": "mit"}) == "other" and export.card_license(False, {"license": "mit"}) == "mit"
    assert export.card_license(True, None) == kr3_license and export.card_license(False, {"license": None}) == "other"


def test_evaluate_and_the_server_name_the_base(unchanged, base, tmp_path):
    from fastapi.testclient import TestClient

    from kr3 import load, serve
    from kr3.stages import evaluate

    _, run = unchanged
    result = evaluate.run(compose([f"checkpoint={run}", "evaluate.device=cpu", "evaluate.precision=fp32",
                                   f"paths.output_dir={tmp_path}"], tmp_path))
    assert result["base_model"] == str(base) and json.loads((tmp_path / "eval.json").read_text())["base_model"] == str(base)
    card = TestClient(serve.app(load(run, device="cpu", precision="fp32"))).get("/v1/models").json()["data"][0]
    assert card["kr3"]["base_model"]["name_or_path"] == str(base) and "folder" not in card["kr3"]["base_model"]


@pytest.mark.e2e
def test_fine_tuning_lowers_the_val_loss_and_the_checkpoint_names_its_base(unchanged, corpus, base, tmp_path, caplog):
    caplog.set_level("INFO", logger="kr3")
    before, _ = unchanged
    after, run = train(corpus, tmp_path, base, "trainer.max_steps=20", "trainer.lr=3e-3", "trainer.eval_interval=0")
    assert after["loss"] < before["loss"] - 0.3
    ckpt = checkpoint.load(checkpoint.step_path(run, 20))
    assert ckpt.base["name_or_path"] == str(base) and set(ckpt.base["sha256"]) == {"model.safetensors"}
    from kr3 import export, load

    m = load(run, device="cpu", precision="fp32")  # the fine-tuned model, exported: transformers computes its logits
    back = transformers.GPT2LMHeadModel.from_pretrained(export.save(m, tmp_path / "hf")).eval()
    probe = torch.randint(0, m.tokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(probe).logits - m.model(probe)).abs().max() < 1e-4
    assert re.search(rf"\nfrom +{re.escape(str(base))} \(model.safetensors [0-9a-f]{{12}}…, licence cc-by-nc-sa-4.0\)\n",
                     caplog.text)


@pytest.mark.e2e
def test_a_fine_tune_resumes_exactly(corpus, base, tmp_path):
    common = ["trainer.max_steps=8", "trainer.ckpt_interval=4", "trainer.eval_interval=0", "trainer.lr=3e-3",
              "trainer.log_interval=1"]  # dropout 0.1 (the model's): the RNG state must come back too
    _, ref = train(corpus, tmp_path, base, *common, run="ref")
    _, resumed = train(corpus, tmp_path, base, *common, f"trainer.resume={checkpoint.step_path(ref, 4)}", run="resumed")
    a, b = ({r["step"]: r["train/loss"] for r in read_metrics(d / "metrics.jsonl") if "train/loss" in r}
            for d in (ref, resumed))
    assert sorted(b) == [5, 6, 7, 8]
    np.testing.assert_allclose([b[s] for s in b], [a[s] for s in b], rtol=1e-6)
    assert checkpoint.load(checkpoint.step_path(resumed, 8)).base == checkpoint.load(checkpoint.step_path(ref, 8)).base


@pytest.mark.e2e
@pytest.mark.slow  # DDP's sums: test_two_processes_match_one; loading weights: the tests above
def test_two_processes_fine_tune_as_one(corpus, base, tmp_path):
    """2 ranks × batch 4 (gloo) follow the losses of 1 process × batch 8; each rank reads the pretrained weights."""
    common = ["trainer.max_steps=6", "trainer.eval_interval=0", "trainer.lr=3e-3", "trainer.log_interval=1",
              "model.dropout=0"]
    train(corpus, tmp_path / "one", base, *common, "trainer.batch_size=8")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "run.py"), "stage=train", *overrides(corpus, tmp_path / "two", base, *common),
                          "trainer.batch_size=4"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    (run,) = (tmp_path / "two" / "outputs").glob("*/*")
    a, b = (({r["step"]: r["train/loss"] for r in read_metrics(d / "metrics.jsonl") if "train/loss" in r})
            for d in (tmp_path / "one" / "run", run))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-4, atol=2e-5)
    assert "cpu × 2 process(es) (DDP)" in (run / "run.log").read_text()


@pytest.mark.e2e
def test_rating_control_tokens_become_new_rows_that_train(corpus, base, tmp_path):
    tok = PretrainedTokenizer(base)
    model, _ = imported(base, tok.vocab_size + 3, controls=(tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 2))
    table = model.tok_emb.weight.detach()
    rows = transformers.GPT2LMHeadModel.from_pretrained(base).transformer.wte.weight.detach()
    controls = [tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 2]
    assert len(table) == len(rows) and torch.equal(table[: tok.vocab_size], rows[: tok.vocab_size])  # spare rows held them
    assert torch.allclose(table[controls], rows[: tok.vocab_size].mean(0).expand(3, -1))  # a token read as an average one
    _, run = train(corpus, tmp_path, base, "data.condition=rating", "trainer.max_steps=6", "trainer.lr=3e-3",
                   "trainer.eval_interval=0")
    ckpt = checkpoint.load(checkpoint.step_path(run, 6))
    assert ckpt.condition.ids == controls
    assert not torch.allclose(ckpt.model["tok_emb.weight"][controls], table[controls])  # they trained


def test_without_spare_rows_the_controls_are_appended_as_the_mean_embedding(base, tmp_path):
    small = tmp_path / "no-spare"
    shutil.copytree(base, small, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    save_gpt2(small, PretrainedTokenizer(base).vocab_size)
    tok = PretrainedTokenizer(small)
    model, _ = imported(small, tok.vocab_size + 3, controls=())
    table = model.tok_emb.weight.detach()
    assert len(table) == tok.vocab_size + 3
    assert torch.allclose(table[-3:], table[:-3].mean(0).expand(3, -1))


def test_data_prepared_with_another_tokenizer_is_refused(corpus, base, tmp_path):
    with pytest.raises(UserError, match=r"the data was prepared with a sentencepiece tokenizer of 400 tokens, not .*'s, "
                                        r"so its token ids mean other pieces to this model — leave the tokenizer "
                                        r"settings out: model=pretrained prepares the data with the model's own tokenizer"):
        train(corpus, tmp_path, base, "tokenizer=sentencepiece", "tokenizer.vocab_size=400", "trainer.max_steps=2")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.e2e
def test_other_architectures_are_one_line(base, tmp_path):
    for model_type, arch in [("gpt_neox", "GPTNeoXForCausalLM"), ("llama", "LlamaForCausalLM"), ("gptj", "GPTJForCausalLM")]:
        other = tmp_path / model_type
        shutil.copytree(base, other)
        (other / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
        with pytest.raises(UserError, match=rf"is a {model_type} model \({arch}\) — model=pretrained reads GPT-2-family "
                                            r"checkpoints \(model_type gpt2, GPT2LMHeadModel\)"):
            imported(other)


def test_a_context_beyond_the_models_positions_is_one_line(base):
    cfg = compose(["model=pretrained", f"model.name_or_path={base}", "model.block_size=65"]).model
    with pytest.raises(UserError, match="model.block_size=65 is longer than the 64 positions .* use model.block_size=64"):
        pretrained.load(cfg, base, PretrainedTokenizer(base), 400, ())


class RunsCode:
    """A pickle that runs code when loaded: a marker file is its only effect."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_broken_or_unsafe_weights_are_one_line_and_run_nothing(base, tmp_path):
    def variant(name, keep=("config.json", "tokenizer.json", "special_tokens_map.json")):
        folder = tmp_path / name
        folder.mkdir()
        for f in keep:
            shutil.copy(base / f, folder / f)
        return folder

    empty = variant("no-weights")
    with pytest.raises(UserError, match=r"no-weights holds no weights \(model.safetensors, .*\) — give the folder"):
        imported(empty)
    truncated = variant("truncated")
    (truncated / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(UserError, match=r"model.safetensors cannot be read as weights \(.*\) — it is incomplete"):
        imported(truncated)
    unsafe = variant("unsafe")
    marker = tmp_path / "code-ran"
    with open(unsafe / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": RunsCode(marker)}, f)
    with pytest.raises(UserError, match=r"pytorch_model.bin is a pickle that holds more than tensors \(code would run "
                                        r"to load it\), so kr3 does not load it"):
        imported(unsafe)
    assert not marker.exists()


@pytest.mark.e2e
def test_a_pytorch_pickle_and_sharded_safetensors_read_the_same(base, tmp_path):
    from safetensors.torch import load_file, save_file

    reference, _ = imported(base)
    state = load_file(base / "model.safetensors")
    as_bin = tmp_path / "bin"
    shutil.copytree(base, as_bin, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(state, as_bin / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    shutil.copytree(base, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: state[k].contiguous() for k in keys}, sharded / file)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in halves.items() for k in keys}}))
    for folder in (as_bin, sharded):
        model, provenance = imported(folder)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert sorted(provenance["sha256"]) == sorted(halves)


def test_a_hub_id_reads_the_hub_cache(base, tmp_path, monkeypatch):
    """The Hub's code path (snapshot_download), offline, on a cache laid out as a download leaves it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "cache" / "models--someone--tiny-gpt2"
    shutil.copytree(base, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    cfg = compose(["model=pretrained", "model.name_or_path=someone/tiny-gpt2", "model.block_size=32"]).model
    folder = pretrained.find(cfg.name_or_path, str(tmp_path / "cache"))
    model, provenance = pretrained.load(cfg, folder, PretrainedTokenizer(base), PretrainedTokenizer(base).vocab_size, ())
    assert provenance["name_or_path"] == "someone/tiny-gpt2" and provenance["folder"].endswith("0123abcd")
    assert provenance["hub"] and provenance["revision"] == "0123abcd"
    with pytest.raises(UserError, match=r"could not download model someone/other from the Hugging Face Hub .* set "
                                        r"model.name_or_path=/path/to/folder"):
        pretrained.find("someone/other", str(tmp_path / "cache"))


@pytest.mark.e2e
def test_kogpt2s_real_tokenizer(kogpt2, corpus, tmp_path):
    """A tiny random model of KoGPT2's vocabulary with its real tokenizer: prepared, fine-tuned a few steps, evaluated."""
    folder = tmp_path / "kogpt2-shaped"
    shutil.copytree(kogpt2, folder)
    save_gpt2(folder, PretrainedTokenizer(kogpt2).vocab_size)
    val, run = train(corpus, tmp_path, folder, "trainer.max_steps=3", "trainer.lr=1e-3", "trainer.eval_interval=0",
                     "trainer.final_eval_tokens=4096")
    assert np.isfinite(val["loss"])
    meta = json.loads((next((tmp_path / "data").glob("local-*")) / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "pretrained" and meta["vocab_size"] == PretrainedTokenizer(kogpt2).vocab_size


def test_rows_without_a_token_are_never_sampled_nor_offered(unchanged):
    """The fixture's model has 8 rows past its tokenizer's vocabulary (as a padded pretrained table does)."""
    from types import SimpleNamespace

    from kr3 import load, sampling

    m = load(unchanged[1], device="cpu", precision="fp32")
    vocab = m.tokenizer.vocab_size
    assert m.model.cfg.vocab_size == vocab + 8
    top = m.next_tokens(PROMPT, k=m.model.cfg.vocab_size)
    assert all(p == 0 for _, p in top[vocab:]) and all(p > 0 for _, p in top[:vocab])
    completer = sampling.Completer(m.model, m.tokenizer, SimpleNamespace(**m.defaults), m.clean)
    ids = list(sampling.sample_tokens(m.model, m.tokenizer.encode(PROMPT), 300, eos_id=-1, temperature=3.0,
                                      generator=torch.Generator().manual_seed(0), banned=completer.never))
    assert len(ids) == 300 and max(ids) < vocab


@pytest.mark.e2e
def test_configs_of_older_transformers_read_the_same(base, tmp_path):
    """No model_type (before configs named it), GPT2Config's other names (hidden_size, n_ctx, …); weights of
    other shapes than config.json's are one line."""
    reference, _ = imported(base)
    config = json.loads((base / "config.json").read_text())
    renamed = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "n_ctx": "n_positions"}
    old = {k: v for k, v in config.items() if k not in ("model_type", *renamed.values())}
    old |= {alias: config[name] for alias, name in renamed.items()}
    folder = tmp_path / "old"
    shutil.copytree(base, folder)
    (folder / "config.json").write_text(json.dumps(old))
    model, _ = imported(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 48, "n_head": 2}))
    with pytest.raises(UserError, match=r"old's weights do not have the shapes its config.json gives \(.*\) — download"):
        imported(folder)
