"""stage=export: a transformers folder that computes kr3's logits, tokenizes as kr3 does and completes as kr3 does,
all offline from local folders."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from kr3 import export, gpt2
from kr3.errors import UserError
from kr3.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
ODD = ["이 집 龍鳳 ㅋㅋㅋㅋㅋ 🍜🔥", "  앞에 공백  두 칸", "끝에 공백 ", "숫자 12345 영어 abc", "漢字만", "ㅋ", "🥟"]


@pytest.fixture(scope="module")
def exported(run_kr3, trained):
    """(the folder `stage=export checkpoint=latest` wrote, by default <run>/hf; the kr3 model it came from)."""
    from kr3 import load

    run_dir, root = trained
    proc = run_kr3(f"paths.root_dir={root}", "stage=export", "checkpoint=latest")
    assert proc.returncode == 0, proc.stderr
    return run_dir / "hf", load(run_dir, "cpu", "fp32")


def val_reviews(m, n: int) -> list[list[int]]:
    """The first n reviews of the prepared val split the model was trained with, as token ids."""
    val = np.fromfile(f"{m.checkpoint.data.dir}/val.bin", dtype=m.checkpoint.data.dtype).astype(np.int64)
    ends = np.flatnonzero(val == m.tokenizer.eos_id)[:n]
    return [val[a + 1 : b].tolist() for a, b in zip([-1, *ends[:-1]], ends)]


@pytest.mark.e2e
def test_transformers_computes_kr3s_logits(exported):
    hf_dir, m = exported
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and type(hf).__name__ == "GPT2LMHeadModel"
    block = m.model.cfg.block_size
    val = np.fromfile(f"{m.checkpoint.data.dir}/val.bin", dtype=m.checkpoint.data.dtype).astype(np.int64)
    ids = torch.from_numpy(val[: 2 * block].copy()).view(2, block)
    with torch.no_grad():
        assert (m.model(ids) - hf.eval()(ids).logits).abs().max() < 1e-4


def test_the_tokenizer_gives_kr3s_ids_on_1000_val_reviews(exported):
    hf_dir, m = exported
    reviews = val_reviews(m, 1000)
    texts = [m.tokenizer.decode(r) for r in reviews]
    assert len(texts) == 1000 and [m.tokenizer.encode(t) for t in texts] == reviews
    assert any("ㅋ" in t for t in texts) and any("\u4e00" <= c <= "\u9fff" for t in texts for c in t)  # ㅋ, Hanja
    assert any(ord(c) >= 0x1F300 for t in texts for c in t)  # emoji
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok(texts, add_special_tokens=False)["input_ids"] == reviews
    assert tok.batch_decode(reviews) == texts


def test_greedy_completions_are_the_same_text(exported):
    hf_dir, m = exported
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    generate = transformers.pipeline("text-generation", model=str(hf_dir))
    for prompt in ["이 집 짜장면은", "여기 냉면", "사장님 ㅋㅋ 龍"]:
        ours = m.complete(prompt, temperature=0, max_new_tokens=20)  # repetition_penalty 1.1 both sides (the default)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        theirs = hf.generate(ids, do_sample=False, max_new_tokens=20)[0]
        assert tok.decode(theirs, skip_special_tokens=True) == m.cleaned(prompt) + ours
        # the pipeline decodes the new tokens alone: like kr3's decode of a review, without its leading space
        new = generate(prompt, do_sample=False, max_new_tokens=20, return_full_text=False)[0]["generated_text"]
        assert new == ours.removeprefix(" ")


def test_config_generation_config_and_model_card(exported, monkeypatch):
    hf_dir, m = exported
    config = json.loads((hf_dir / "config.json").read_text())
    c = m.model.cfg
    assert {k: config[k] for k in ("n_layer", "n_head", "n_embd", "n_inner", "n_positions", "vocab_size")} == {
        "n_layer": c.n_layers, "n_head": c.n_heads, "n_embd": c.d_model, "n_inner": c.d_ffn, "n_positions": c.block_size,
        "vocab_size": c.vocab_size}
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert {k: gen[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")} == {
        "temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 64}
    assert gen["eos_token_id"] == m.tokenizer.eos_id and gen["do_sample"]
    card = (hf_dir / "README.md").read_text()
    assert "license: other" in card and f"**{m.checkpoint.val['bpc']:.4f} bits per character**" in card
    monkeypatch.setitem(m.checkpoint.config["data"], "name", "kr3")  # as with data=kr3
    card = export.model_card(m)
    assert "license: cc-by-nc-sa-4.0" in card and "datasets: [leey4n/KR3]" in card and "CC BY-NC-SA 4.0" in card


def test_an_export_replaces_an_earlier_one_and_no_other_folder(exported, tmp_path, monkeypatch):
    hf_dir, m = exported
    export.save(m, hf_dir)
    assert (hf_dir / "model.safetensors").exists() and not list(hf_dir.parent.glob(".hf.*"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"export.dir={mine} holds other files — give a new or empty folder"):
        export.save(m, mine)
    monkeypatch.setattr(export, "model_card", lambda *a: 1 / 0)  # fails after the weights are written
    with pytest.raises(ZeroDivisionError):
        export.save(m, tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # neither the folder nor its temp


def test_an_export_dir_that_is_or_lies_in_a_file_is_one_line(exported, tmp_path):
    _, m = exported
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(UserError, match=f"export.dir={a_file} is a file — give a new or empty folder"):
        export.save(m, a_file)
    with pytest.raises(UserError, match=f"cannot write {a_file / 'hf'} .* — give a path in a folder you can write"):
        export.save(m, a_file / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and a_file.read_text() == "mine"


def test_bias_false_is_exported_as_zero_biases_exactly():
    cfg = GPTConfig(vocab_size=300, n_layers=2, n_heads=2, d_model=32, d_ffn=64, block_size=16, bias=False)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2.to_config(cfg, eos_id=2))).eval()
    state = gpt2.to_state_dict(model)
    assert all(not v.any() for k, v in state.items() if k.endswith(".bias"))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to wte
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def test_an_option_gpt2_cannot_express_is_one_line(monkeypatch):
    monkeypatch.setattr(gpt2, "EXPRESSED", tuple(f for f in gpt2.EXPRESSED if f != "bias"))  # as a later field
    cfg = GPTConfig(vocab_size=300, n_layers=1, n_heads=1, d_model=8, d_ffn=8, block_size=8, bias=False)
    with pytest.raises(UserError, match="model.bias=False has no GPT-2 equivalent, so this checkpoint cannot be exported"):
        gpt2.to_config(cfg, 2)


def test_a_model_given_its_rating_at_every_token_is_not_exported():
    cfg = GPTConfig(vocab_size=300, n_layers=1, n_heads=1, d_model=8, d_ffn=8, block_size=8, controls=(3, 4, 5))
    with pytest.raises(UserError, match="model.rating_embedding=true has no GPT-2 equivalent.*"
                                        "export one trained with model.rating_embedding=false"):
        gpt2.to_config(cfg, 2)


def test_without_transformers_it_says_what_to_install(monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find(name, *a))
    with pytest.raises(UserError, match=r"needs transformers — pip install 'kr3\[hf\]' \(in a checkout: uv sync --extra hf\)"):
        export.require_hf()


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_converts_exactly(model_type, make_reviews, tmp_path):
    from omegaconf import OmegaConf

    from kr3.tokenizer import SentencePieceTokenizer

    texts = [t for _, t in make_reviews(3000, seed=5)] + ODD
    cfg = OmegaConf.create({"model_type": model_type, "vocab_size": 380, "character_coverage": 0.9995,
                            "byte_fallback": True, "input_sentence_size": 300000, "max_sentence_length": 8192,
                            "train_threads": 1})
    tok = SentencePieceTokenizer.build(cfg, texts, seed=0)
    export.write_tokenizer({"spiece.model": tok.proto}, tok, 64, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = [tok.encode(t) for t in texts]
    assert hf(texts, add_special_tokens=False)["input_ids"] == ids
    assert hf.batch_decode(ids) == [tok.decode(i) for i in ids]


def test_a_pretrained_tokenizer_is_copied(kogpt2, tmp_path, make_reviews):
    from kr3.tokenizer import PretrainedTokenizer, to_files

    tok = PretrainedTokenizer(kogpt2)
    export.write_tokenizer(to_files(kogpt2), tok, 64, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (kogpt2 / "tokenizer.json").read_bytes()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [t for _, t in make_reviews(300, seed=7)] + ODD
    ids = [tok.encode(t) for t in texts]
    assert hf(texts, add_special_tokens=False)["input_ids"] == ids
    assert hf.batch_decode(ids, skip_special_tokens=True) == [tok.decode(i) for i in ids]


def test_a_llama_model_given_its_rating_at_every_token_is_not_exported():
    from kr3 import llama

    cfg = GPTConfig(vocab_size=300, n_layers=1, n_heads=1, d_model=8, d_ffn=8, block_size=8, arch="llama", controls=(3,))
    with pytest.raises(UserError, match="model.rating_embedding has no Llama equivalent"):
        llama.to_config(cfg, 1)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, train_tiny, make_reviews):
    """A tiny model.arch=llama run (rotary, RMSNorm, SwiGLU, no biases), trained for 60 steps, and the kr3 model."""
    from kr3 import load

    root = tmp_path_factory.mktemp("llama")
    run = train_tiny(root, make_reviews(3000, seed=5), "tokenizer.vocab_size=500", "model.arch=llama",
                     "trainer.max_steps=60", "trainer.lr=3e-3", "trainer.warmup_steps=10")
    return run, load(run, "cpu", "fp32")


@pytest.mark.e2e
def test_a_llama_model_exports_as_llama_and_completes_in_kr3_and_transformers_alike(llama_run, tmp_path):
    from kr3 import serve

    run, m = llama_run
    out = export.save(m, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and type(hf).__name__ == "LlamaForCausalLM"
    assert "Llama (LlamaForCausalLM)" in (out / "README.md").read_text()
    val = np.fromfile(f"{m.checkpoint.data.dir}/val.bin", dtype=m.checkpoint.data.dtype).astype(np.int64)
    ids = torch.from_numpy(val[: 2 * m.model.cfg.block_size].copy()).view(2, -1)
    with torch.no_grad():
        assert (m.model(ids) - hf.eval()(ids).logits).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for prompt in ["이 집 짜장면은", "분위기가"]:
        ours = m.complete(prompt, temperature=0, max_new_tokens=20)
        theirs = hf.generate(tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"], do_sample=False,
                             max_new_tokens=20)[0]
        assert tok.decode(theirs, skip_special_tokens=True) == m.cleaned(prompt) + ours
    from fastapi.testclient import TestClient

    reply = TestClient(serve.app(m)).post("/v1/completions", json={"prompt": "이 집", "max_tokens": 8, "temperature": 0,
                                                                   "n": 2})
    assert reply.status_code == 200 and {c["text"] for c in reply.json()["choices"]} == {
        m.complete("이 집", temperature=0, max_new_tokens=8)}
