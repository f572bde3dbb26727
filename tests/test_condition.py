"""data.condition=rating end to end: a corpus whose ratings are trivially predictable from one word, a tiny
conditioned model trained on it, and the model as a generative classifier of those ratings."""

import json
import random

import numpy as np
import pytest
import torch

from kr3 import checkpoint, classify, rating_loss
from kr3.config import compose

WORDS = {0: ["별로예요", "최악이에요", "실망했어요"], 1: ["최고예요", "맛있어요", "추천해요"],
         2: ["그냥 그래요", "보통이에요", "무난해요"]}
FOODS = ["짜장면", "김치찌개", "떡볶이", "삼겹살", "비빔밥", "냉면", "치킨", "파스타", "국밥", "라면", "만두", "초밥"]
PLACES = ["이 집", "여기", "우리 동네 식당", "이 가게", "역 앞 가게", "회사 근처 식당"]


def rated_reviews(n: int, seed: int = 0) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        r = rng.randrange(3)
        out.add((r, f"{rng.choice(PLACES)} {rng.choice(FOODS)} {rng.choice(WORDS[r])}{rng.choice(['', '!', ' ㅋㅋ', '.'])}"))
    return sorted(out)


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory, train_tiny):
    """A tiny model trained on rated reviews with data.condition=rating: (run folder, root)."""
    root = tmp_path_factory.mktemp("cond")
    run = train_tiny(root, rated_reviews(1200), "tokenizer.vocab_size=400", "data.condition=rating",
                     "trainer.max_steps=250", "trainer.lr=3e-3", "trainer.batch_size=16")
    return run, root


@pytest.mark.e2e
def test_the_conditioned_model_classifies_ratings(conditioned):
    run_dir, _ = conditioned
    model, tok, ckpt = checkpoint.load_model(run_dir, "cpu")
    controls = ckpt.condition.controls
    assert model.cfg.controls == tuple(controls.values())  # model.rating_embedding is on by default
    val = np.fromfile(f"{ckpt.data.dir}/val.bin", dtype=ckpt.data.dtype)
    reviews = classify.reviews_of(val, tok.eos_id, controls)
    assert len(reviews) == ckpt.data.splits["val"]["reviews"] > 30
    labels = np.array([r for r, _ in reviews])
    ll = classify.log_likelihoods(model, [t for _, t in reviews], controls, tok.eos_id, 32, torch.device("cpu"),
                                  torch.float32)
    prior = np.array([ckpt.data.splits["train"]["ratings"][str(r)] for r in range(3)], dtype=float)
    chars = np.array([len(tok.decode(t)) for _, t in reviews])
    result = classify.report(ll, labels, chars, prior, {0: "negative", 1: "positive", 2: "ambiguous"})
    binary, three = result["classifier"]["binary (0/1)"], result["classifier"]["three ratings"]
    assert binary["accuracy"] > 0.9 > binary["majority"] + 0.2
    assert three["accuracy"] > 0.8 > three["majority"] + 0.3
    assert set(result["per_rating"]) == {"negative", "positive", "ambiguous"}
    assert all(0 < v["bpc"] < 8 for v in result["per_rating"].values())


def test_evaluate_reports_bpc_per_rating_and_the_classifier(conditioned):
    from kr3.stages import evaluate

    run_dir, root = conditioned
    result = evaluate.run(compose(["stage=evaluate", f"checkpoint={run_dir}", "evaluate.precision=fp32",
                                   f"paths.output_dir={root / 'e'}"], root))
    assert result["classifier"]["binary (0/1)"]["accuracy"] > 0.9
    assert set(result["per_rating"]) == {"negative", "positive", "ambiguous"}
    assert sum(v["reviews"] for v in result["per_rating"].values()) == result["classifier"]["three ratings"]["reviews"]


def test_rating_steers_completions(conditioned):
    import kr3

    m = kr3.load(conditioned[0], device="cpu", precision="fp32")
    assert m.ratings == ["negative", "positive", "ambiguous"]
    for rating, words in WORDS.items():
        texts = m.complete("이 집 짜장면", rating=rating, num_samples=8, max_new_tokens=8, temperature=0.7)
        own = sum(any(w in t for w in words) for t in texts)
        assert own >= 6, (rating, texts)
    for rating, words in ((0, WORDS[0]), (1, WORDS[1])):
        (first, p), = m.next_tokens("이 집 짜장면", k=1, rating=rating)
        assert first.strip() and any(w.startswith(first.strip()) for w in words) and p > 0.2, (rating, first, p)
    with pytest.raises(kr3.errors.UserError, match="rating=great is not a rating — use one of: negative"):
        m.complete("이 집", rating="great")


def test_model_rating_embedding_false_leaves_the_rating_to_the_control_token_alone(tmp_path):
    from kr3.model import GPTConfig

    for switch, expected in (("true", (3, 4, 5)), ("false", ())):
        cfg = compose(["stage=train", "model=tiny", f"model.rating_embedding={switch}"], tmp_path)
        assert GPTConfig.from_cfg(cfg.model, 300, (3, 4, 5)).controls == expected
    assert GPTConfig.from_cfg(cfg.model, 300).controls == ()  # unconditioned data has no control tokens


def test_guidance_steers_away_from_the_other_ratings(conditioned):
    import kr3

    m = kr3.load(conditioned[0], device="cpu", precision="fp32")

    def share(rating: int, guidance: float, words: list[str]) -> float:
        top = m.next_tokens("이 집 짜장면", k=50, rating=rating, guidance=guidance)
        return sum(p for t, p in top if t.strip() and any(w.startswith(t.strip()) for w in words))

    for rating in (0, 1, 2):
        others = [w for r, words in WORDS.items() if r != rating for w in words]
        assert share(rating, 3.0, WORDS[rating]) > share(rating, 1.0, WORDS[rating]), rating
        assert share(rating, 3.0, others) < share(rating, 1.0, others) / 4, rating
    with pytest.raises(kr3.errors.UserError, match=r"guidance=0.5"):
        m.complete("이 집", rating="negative", guidance=0.5)


def test_guided_sampling_keeps_each_rating_when_the_context_refills(conditioned, monkeypatch):
    from kr3 import decoder, sampling

    model, tok, ckpt = checkpoint.load_model(conditioned[0], "cpu")
    heads = [[tok.eos_id, c] for c in ckpt.condition.ids]
    rows, real = [], decoder.Sampler.context
    monkeypatch.setattr(decoder.Sampler, "context", lambda s, refill: rows.append(real(s, refill)) or rows[-1])
    new = list(sampling.sample_tokens(model, tok.encode("이 집"), 3 * model.cfg.block_size, tok.eos_id,
                                      temperature=0, banned=[tok.eos_id], heads=heads, guidance=3.0))
    assert len(new) == 3 * model.cfg.block_size
    refills = rows[1:]
    assert len(refills) >= 3 and all(row[:2] == h for r in refills for row, h in zip(r, heads))
    assert all(len(row) <= model.cfg.block_size for r in refills for row in r)


def test_rating_on_an_unconditioned_checkpoint_is_one_line(trained):
    import kr3

    m = kr3.load(trained[0], device="cpu")
    assert m.ratings is None
    with pytest.raises(kr3.errors.UserError, match="trained without ratings — train with data.condition=rating"):
        m.complete("이 집", rating="negative")


@pytest.mark.e2e
def test_generate_rating_on_the_command_line_and_in_the_repl(run_kr3, conditioned):
    run_dir, root = conditioned
    base = [f"paths.root_dir={root}", "stage=generate", f"checkpoint={run_dir}", "generate.temperature=0",
            "generate.max_new_tokens=6", "generate.precision=fp32"]  # the same words on every CPU
    one = run_kr3(*base, "generate.rating=negative", "generate.prompt=이 집 짜장면")
    assert one.returncode == 0, one.stderr
    assert any(w in one.stdout for w in WORDS[0]), one.stdout
    repl = run_kr3(*base, stdin=":rating positive\n이 집 짜장면\n:rating great\n:foo\n:help\nexit\n")
    assert repl.returncode == 0, repl.stderr
    assert "rating=positive" in repl.stdout and any(w in repl.stdout for w in WORDS[1])
    assert "rating=great is not a rating" in repl.stdout and "rating stays positive" in repl.stdout
    assert ":show_next, :rating, exit" in repl.stdout and ":rating VALUE" in repl.stdout  # :foo and :help name it


def test_the_repls_guidance_reaches_show_next(conditioned):
    import io

    import kr3
    from kr3 import repl

    run_dir, root = conditioned
    m = kr3.load(run_dir, device="cpu", precision="fp32")
    g = compose(["stage=generate", "generate.show_next=8", "generate.max_new_tokens=1"], root).generate
    tables = {}
    for guidance in (3, 1):
        repl.command(g, f":guidance {guidance}", m)
        repl.command(g, ":rating negative", m)
        out = io.StringIO()
        repl.answer(m, g, "이 집 짜장면", out)
        tables[guidance] = out.getvalue()
        assert tables[guidance].startswith(repl.next_token_table(m.next_tokens("이 집 짜장면", 8, rating="negative",
                                                                                guidance=guidance)))
    assert tables[1] != tables[3]
    assert m.next_tokens("이 집 짜장면", 8, rating="negative", guidance=1) != \
        m.next_tokens("이 집 짜장면", 8, rating="negative", guidance=3)  # so the tables above tell them apart


def test_a_rated_prompt_is_cut_to_leave_room_for_its_rating(conditioned):
    """[EOS, control, prompt…] fills the context: a long prompt keeps block_size − 3 tokens, as the server's usage
    says."""
    from fastapi.testclient import TestClient

    import kr3
    from kr3 import serve

    m = kr3.load(conditioned[0], device="cpu", precision="fp32")
    long = "맛있는 짜장면 " * 200
    assert m.completions(long, rating="negative", max_new_tokens=1)[0]["prompt_tokens"] == m.model.cfg.block_size - 3
    reply = TestClient(serve.app(m)).post("/v1/completions", json={"prompt": long, "rating": "negative",
                                                                   "max_tokens": 1, "seed": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == m.model.cfg.block_size - 3


def test_control_tokens_are_never_text(conditioned):
    """After EOS the model expects a control token; without a rating none may be sampled or offered as text."""
    import kr3
    from kr3.ratings import PIECES

    m = kr3.load(conditioned[0], device="cpu", precision="fp32")
    texts = m.complete("", num_samples=6, max_new_tokens=4, temperature=1.0)
    offered = [text for text, _ in m.next_tokens("", k=20)]
    for control in PIECES.values():
        assert not any(control in t for t in texts + offered), (texts, offered)


@pytest.mark.e2e
def test_a_rating_for_an_unconditioned_checkpoint_stops_before_any_output(run_kr3, trained, tmp_path):
    import shutil

    # a copy of the run that no other test generates from
    run_dir = shutil.copytree(trained[0] / "checkpoints", tmp_path / "run" / "checkpoints").parent
    proc = run_kr3(f"paths.root_dir={trained[1]}", "stage=generate", f"checkpoint={run_dir}", "generate.rating=negative",
                   "generate.prompt=이 집 짜장면")
    assert proc.returncode == 2 and "trained without ratings" in proc.stderr and "이 집" not in proc.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # no folder left, not even generate/


@pytest.mark.parametrize("scored_rows", [4, 5])
def test_the_rating_loss_is_the_classifier_cross_entropy_of_each_review(scored_rows):
    """training_losses scores the first whole review of a row under every rating exactly as the evaluation does
    (log_likelihoods); what follows it in the row changes nothing, and a row whose review is cut is left out
    (scored or not: the last row)."""
    from kr3.model import GPT, GPTConfig

    torch.manual_seed(0)
    eos, controls, T = 2, {0: 3, 1: 4, 2: 5}, 16
    model = GPT(GPTConfig(vocab_size=24, n_layers=2, n_heads=2, d_model=32, d_ffn=64, block_size=T, controls=(3, 4, 5)))
    labels, lengths = [0, 2, 1, 1], [3, 7, 5, 4]
    texts = [torch.randint(6, 24, (n,)).tolist() for n in lengths]
    rows = [[eos, controls[r], *t, eos, controls[(r + 1) % 3], *torch.randint(6, 24, (T,)).tolist()][: T + 1]
            for r, t in zip(labels, texts)]
    rows.append([eos, controls[0], *torch.randint(6, 24, (T - 1,)).tolist()])  # cut by the row's end
    seqs = torch.tensor(rows)
    x, y = seqs[:, :-1], seqs[:, 1:]
    prior = np.array([0.2, 0.5, 0.3])
    scored = rating_loss.scored_reviews(x[:scored_rows], y[:scored_rows], torch.tensor([3, 4, 5]), eos)
    lm, rating = rating_loss.training_losses(model, model.head.weight, x, y, scored, torch.tensor(prior).log().float())
    ll = classify.log_likelihoods(model, texts, controls, eos, 8, torch.device("cpu"), torch.float32)
    expected = torch.nn.functional.cross_entropy(torch.tensor(ll + np.log(prior)), torch.tensor(labels))
    assert rating.item() == pytest.approx(expected.item(), rel=1e-5)
    assert lm.item() == pytest.approx(model(x, y).item(), rel=1e-5)
    rating.backward()  # the rating loss alone trains the model
    assert model.tok_emb.weight.grad[3:6].abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0


def test_the_rating_loss_scores_each_rows_first_whole_rated_review():
    """Rows of: a review's tail (its control token in an earlier row), a rated review, an unrated one, a rated one
    cut by the row's end; a cut rated review alone; no rated review at all."""
    eos = 2
    x = torch.tensor([[9, 9, eos, 3, 10, 11, eos, 12, 13, eos, 4, 15, 16],
                      [eos, 4, 15, 16, 17, 18, 19, 20, 21, 22, 23, 15, 16],
                      [9, 9, eos, 12, 13, eos, 14, 15, 16, 17, 18, 19, 20]])
    y = torch.cat([x[:, 1:], torch.tensor([[17], [17], [21]])], 1)
    start, end, whole = rating_loss.first_reviews(x, y, torch.tensor([3, 4, 5]), eos)
    assert whole.tolist() == [True, False, False]
    assert (start[0].item(), end[0].item()) == (3, 5)  # positions 3–5 predict 10, 11 and the review's EOS


def test_the_rating_loss_asks_the_device_for_nothing():
    """Once the reviews are found on the host, training_losses reads no count or value back (each would be a
    sync per step on a GPU): it runs, backward too, on the meta device, where any op whose result depends on the
    data (nonzero, a boolean mask, item) raises. With no whole review in the scored rows the loss is zero."""
    from kr3.model import GPT, GPTConfig

    eos, controls, meta = 2, torch.tensor([3, 4, 5]), torch.device("meta")
    shape = dict(vocab_size=24, n_layers=1, n_heads=2, d_model=16, d_ffn=32, block_size=12, controls=(3, 4, 5))
    whole = [eos, 3, 10, 11, eos, 12, 13, 14, 15, 16, 17, 18, 19]
    cut = [eos, 4, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    seqs = torch.tensor([whole, cut, whole])
    x, y = seqs[:, :-1], seqs[:, 1:]
    scored = rating_loss.scored_reviews(x[:2], y[:2], controls, eos)
    assert scored.rows.tolist() == [0]
    with meta:
        model = GPT(GPTConfig(**shape))
    lm, rating = rating_loss.training_losses(model, model.head.weight, x.to(meta), y.to(meta), scored.to(meta),
                                          torch.zeros(3, device=meta))
    (lm + rating).backward()
    assert rating.device == meta and model.head.weight.grad is not None
    none = rating_loss.scored_reviews(x[1:2], y[1:2], controls, eos)
    model = GPT(GPTConfig(**shape))
    assert rating_loss.training_losses(model, model.head.weight, x, y, none, torch.zeros(3))[1].item() == 0


@pytest.mark.e2e
def test_training_with_the_rating_loss_logs_it_and_learns_the_ratings(tmp_path, train_tiny):
    run = train_tiny(tmp_path, rated_reviews(600), "tokenizer.vocab_size=400", "data.condition=rating",
                     "trainer.max_steps=60", "trainer.lr=3e-3", "trainer.batch_size=16", "trainer.rating_loss=0.1")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rating = [r["train/rating_loss"] for r in rows if "train/rating_loss" in r]
    # from about log 3 (chance among three ratings) to a fraction of it
    assert len(rating) == 60 and np.mean(rating[:5]) > 0.8 and np.mean(rating[-5:]) < 0.2


def test_the_rating_loss_needs_rated_data(tmp_path):
    import kr3
    from kr3.stages import train

    with pytest.raises(kr3.errors.UserError, match="trainer.rating_loss=0.1 .* needs data.condition=rating"):
        train.run(compose(["stage=train", "experiment=smoke", "trainer.rating_loss=0.1", "data=local",
                           f"data.path={tmp_path / 'none.parquet'}", f"paths.output_dir={tmp_path / 'run'}"], tmp_path))
