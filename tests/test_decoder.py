"""Completions decoded together (kr3.decoder.Batch) are the completions decoded alone: rows at their own positions in
one KV cache, joining and leaving between steps, prompts prefilled in a padded batch, contexts refilled when full."""

import pytest
import torch

from kr3 import checkpoint
from kr3.decoder import Batch, Sampler, choose
from kr3.model import GPT, GPTConfig, KVCache
from kr3.sampling import sample_tokens

PROMPTS = ["이 집 짜장면은", "분위기가 좋고 사장님이 친절해서 자주 와요", "", "가격 대비",
           "국물이 진하고 면이 쫄깃해서 또 오고 싶어요 정말"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_at_their_own_positions_equal_each_row_alone(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_layers=2, n_heads=2, d_model=32, d_ffn=64, block_size=16,
                          controls=(3, 4), arch=arch)).eval()
    rows = [torch.randint(5, 97, (n,)) for n in (3, 7, 1)]
    rows[1][2] = 4  # a control token: its embedding is carried in the cache's row
    cache = KVCache(model.cfg, 3, "cpu", torch.float32)
    fresh = KVCache(model.cfg, 3, "cpu", torch.float32)
    padded = torch.stack([torch.cat([r, torch.zeros(7 - len(r), dtype=torch.long)]) for r in rows])
    model(padded, cache=fresh)
    cache.put([0, 1, 2], fresh, torch.tensor([len(r) for r in rows]))
    more = torch.randint(5, 97, (3, 4))
    steps = torch.cat([model(more[:, t : t + 1], cache=cache) for t in range(4)], 1)
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, more[i]])[None])[0, len(r) :]
        torch.testing.assert_close(steps[i], alone, atol=1e-5, rtol=1e-4)
    assert cache.lengths.tolist() == [7, 11, 5]


@pytest.fixture(scope="module")
def small(trained):
    model, tok, _ = checkpoint.load_model(trained[0], "cpu")
    return model.float().eval(), tok


def greedy(model, tok, prompt: str, max_new_tokens: int = 24) -> Sampler:
    return Sampler(tok.encode(prompt), max_new_tokens, tok.eos_id, model.cfg.block_size, temperature=0)


def test_greedy_completions_decoded_together_equal_each_decoded_alone(small):
    model, tok = small
    lengths = [10, 24, 15, 30, 20]  # ends at different steps, or at EOS
    eos = [-1, -1, tok.eos_id, -1, tok.eos_id]  # an empty prompt starts at EOS
    alone = [list(sample_tokens(model, tok.encode(p), n, e, temperature=0)) for p, n, e in zip(PROMPTS, lengths, eos)]
    batch, samplers, sizes = Batch(model, max_rows=3), [], []
    for step in range(200):
        if step % 2 == 0 and len(samplers) < len(PROMPTS):  # one joins every other step, while others decode
            i = len(samplers)
            samplers.append(Sampler(tok.encode(PROMPTS[i]), lengths[i], eos[i], model.cfg.block_size, temperature=0))
            batch.join(samplers[-1])
        if not batch.busy and len(samplers) == len(PROMPTS):
            break
        batch.step()
        sizes.append(len(batch.owners))
    assert [s.new for s in samplers] == alone
    assert max(sizes) == 3 and not batch.owners  # at most max_rows at once; all rows freed at the end


def test_sampled_completions_with_their_seeds_equal_each_decoded_alone(small):
    model, tok = small

    def sampler(prompt, seed):
        return Sampler(tok.encode(prompt), 30, tok.eos_id, model.cfg.block_size, temperature=1.0, top_k=50, top_p=0.95,
                       repetition_penalty=1.1, generator=torch.Generator().manual_seed(seed))

    batch = Batch(model, max_rows=8)
    together = [sampler(p, seed) for seed, p in enumerate(PROMPTS)]
    for s in together:
        batch.join(s)
    while batch.busy:
        batch.step()
    alone = []
    for seed, p in enumerate(PROMPTS):
        s = sampler(p, seed)
        alone.append(list(sample_tokens(model, s.given, 30, tok.eos_id, 1.0, 50, 0.95, 1.1, s.picking[-1])))
    assert [s.new for s in together] == alone


def test_a_completion_that_fills_the_context_is_refilled_in_the_batch(small):
    model, tok = small
    n = 2 * model.cfg.block_size + 5
    long = [Sampler(tok.encode(p), n, -1, model.cfg.block_size, temperature=0) for p in PROMPTS[:2]]  # no EOS
    batch = Batch(model, max_rows=4)
    for s in long:
        batch.join(s)
    while batch.busy:
        batch.step()
    assert [s.new for s in long] == [list(sample_tokens(model, tok.encode(p), n, -1, temperature=0)) for p in PROMPTS[:2]]
    assert all(len(s.new) == n for s in long)


def test_a_completion_that_leaves_frees_its_rows_for_the_others(small):
    model, tok = small
    batch = Batch(model, max_rows=2)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    first, second, third = (Sampler(tok.encode(p), 40, -1, model.cfg.block_size, temperature=0) for p in prompts)
    for s in (first, second, third):
        batch.join(s)
    batch.step()
    assert batch.active == [first, second] and list(batch.joining) == [third]
    batch.step()
    batch.leave(first)  # its client left: the last row moves into its place
    assert first.done and batch.owners == [second] and second.rows == [0]
    while batch.busy:
        batch.step()
    alone = [list(sample_tokens(model, tok.encode(p), 40, -1, temperature=0)) for p in prompts[1:]]
    assert [second.new, third.new] == alone


def test_a_completion_that_fails_fails_alone(small):
    model, tok = small
    batch = Batch(model, max_rows=4)
    good, bad = greedy(model, tok, PROMPTS[0]), greedy(model, tok, PROMPTS[1])
    bad.take = lambda token: 1 / 0
    batch.join(good), batch.join(bad)
    while batch.busy:
        batch.step()
    assert isinstance(bad.failed, ZeroDivisionError) and good.failed is None
    assert good.new == list(sample_tokens(model, tok.encode(PROMPTS[0]), 24, tok.eos_id, temperature=0))


def test_the_end_of_review_waits_for_min_new_tokens():
    eos = 2
    logits = torch.zeros(2, 10)
    logits[:, eos], logits[:, 7] = 5.0, 1.0  # EOS is the most likely token, 7 the next
    samplers = [Sampler([5], 10, eos, 16, temperature=0, min_new_tokens=2, banned=[7]),
                Sampler([5], 10, eos, 16, temperature=0, min_new_tokens=2)]
    assert choose(samplers, logits, [[0], [1]]) == [0, 7]  # EOS not yet; banned ids still never
    for s in samplers:
        s.take(4), s.take(4)
    assert choose(samplers, logits, [[0], [1]]) == [eos, eos]


def test_min_new_tokens_gives_completions_of_that_length(small):
    model, tok = small
    natural = greedy(model, tok, PROMPTS[2], max_new_tokens=30)  # an empty prompt: this model ends it early
    fixed = Sampler(tok.encode(PROMPTS[2]), 30, tok.eos_id, model.cfg.block_size, temperature=0, min_new_tokens=30)
    batch = Batch(model, max_rows=2)
    batch.join(natural), batch.join(fixed)
    while batch.busy:
        batch.step()
    assert len(natural.new) < 30 and len(fixed.new) == 30 and tok.eos_id not in fixed.new


def test_guided_completions_decoded_together_equal_each_alone(rated_run):
    import kr3

    m = kr3.load(rated_run, device="cpu", precision="fp32")
    options = {"temperature": 0, "guidance": 3.0, "max_new_tokens": 20}
    wanted = [(p, r) for p in PROMPTS[:3] for r in ("negative", "positive")]
    generations = [m._completer({**options, "rating": r}).generation(p) for p, r in wanted]
    batch = Batch(m.model, max_rows=32)
    for g in generations:
        batch.join(g)
    while batch.busy:
        batch.step()
    assert all(len(g.heads) == 3 for g in generations)
    assert [g.completion for g in generations] == [m.complete(p, rating=r, **options) for p, r in wanted]
