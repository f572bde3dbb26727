"""kr3 as a model of EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra): its three kinds of request
on a loaded kr3.Model — log-likelihoods of continuations (batched), of whole texts (in the context's windows, as
stage=evaluate scores) and greedy completions until a stop string —, the KR3 task suite (`kr3_cloze`, `kr3_rating`,
`kr3_bpc`, written from a checkpoint's val reviews) and `evaluate`, which stage=evaluate runs for `evaluate.tasks`."""

from __future__ import annotations

import json
import random
from difflib import get_close_matches
from pathlib import Path

import numpy as np
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from omegaconf import OmegaConf

from kr3 import api, prepared, ratings
from kr3 import data as kdata
from kr3.atomic import replacing
from kr3.errors import UserError
from kr3.scoring import batch_logprobs, token_logprobs


class HarnessModel(LM):
    """A loaded kr3.Model as an lm-eval model: lm_eval.simple_evaluate(model=HarnessModel(kr3.load(...)), ...). Texts are
    encoded as they are given (no cleaning: a task's formatting is its own). A context is read as it is and an empty
    one is an end-of-review token, as lm-eval's own models and its local-completions model through stage=serve read
    them, so both give the same numbers; a whole text (loglikelihood_rolling) is read after an end-of-review token,
    from a review's start."""

    def __init__(self, model: api.Model, batch_size: int = 32):
        super().__init__()
        self.m, self.batch = model, batch_size

    def ids(self, text: str) -> list[int]:
        return self.m.token_ids(text)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        eos = self.m.tokenizer.eos_id
        rows = [(self.ids(context) or [eos], self.ids(continuation)) for context, continuation in (r.args for r in requests)]
        scored = batch_logprobs(self.m.model, rows, self.batch, self.m.device, self.m.dtype, top=1)
        # greedy: each token as likely as the likeliest (lm-eval's local-completions compares the same way)
        return [(float(lp.sum()), bool((lp == top[:, 0]).all())) for lp, _, top in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        eos = self.m.tokenizer.eos_id
        return [float(token_logprobs(self.m.model, [eos], self.ids(text), self.m.device, self.m.dtype)[0].sum())
                for (text,) in (r.args for r in requests)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, options in (r.args for r in requests):
            until = [s for s in options.get("until", []) if s]
            out.append(self.m.complete(context, temperature=0, stop=until or None,
                                       max_new_tokens=int(options.get("max_gen_toks", 64))))
        return out


KR3_TASKS = {
    # a review's first half of words, its true second half against three other reviews' (HellaSwag's form)
    "kr3_cloze": """\
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    # a val review's rating, negative or positive: for a rating-conditioned model, the rating under whose control token
    # the review is likelier (Bayes' rule with equal priors: one context per rating, lm-eval's multiple input); for
    # another, the likelier of a negative and a positive remark after the review (RATING_WORDS)
    "kr3_rating": """\
output_type: multiple_choice
doc_to_text: "{{text}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{target}}"
target_delimiter: ""
metric_list:
  - metric: acc
""",
    # each review scored whole from its start: perplexity per word and per byte, bits per byte
    "kr3_bpc": """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}
MAX_ITEMS = 1000  # of each kr3 task: the val split's first reviews
RATING_WORDS = {0: " 별로예요", 1: " 좋아요"}  # "it is not good", "it is good": an unconditioned model's rating


def write_kr3_tasks(m: api.Model, folder: Path, seed: int = 0) -> Path:
    """The KR3 task suite's YAML files and items in `folder`, from the val reviews of the data `m` was trained on (no
    Hub): lm-eval's `--include_path` (or evaluate.include_path) takes the folder."""
    reviews = val_reviews(m)
    rng = random.Random(seed)
    halves = [(" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])) for w in (r.split() for r in reviews) if len(w) >= 4]
    items = {"kr3_cloze": [cloze_item(i, halves, rng) for i in range(min(MAX_ITEMS, len(halves)))],
             "kr3_rating": [rating_item(m, text, rating) for text, rating in rated_val_reviews(m)[:MAX_ITEMS]],
             "kr3_bpc": [{"text": r} for r in reviews[:MAX_ITEMS]]}
    for task, rows in items.items():
        if not rows:
            raise UserError(f"{task}: the val split of {m.checkpoint.data.dir} has no review to make its items of")
        with replacing(folder / f"{task}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / task}.jsonl\n" \
               "test_split: test\n"
        with replacing(folder / f"{task}.yaml") as tmp:
            tmp.write_text(head + KR3_TASKS[task], encoding="utf-8")
    return folder


def cloze_item(i: int, halves: list[tuple[str, str]], rng: random.Random) -> dict:
    """Review i's opening, and its ending among three others' at a random place."""
    others = [halves[j][1] for j in rng.sample(range(len(halves)), min(len(halves), 8)) if halves[j][1] != halves[i][1]]
    choices = [halves[i][1], *others[:3]]
    order = rng.sample(range(len(choices)), len(choices))
    return {"context": halves[i][0], "choices": [choices[k] for k in order], "label": order.index(0)}


def rating_item(m: api.Model, text: str, rating: int) -> dict:
    """A conditioned model's item: the review after each rating's [end of review, control token], the true one
    numbered; another's: the review, then the rating words (kr3_rating's comment says why)."""
    if m.checkpoint.condition:
        eos = m.tokenizer.id_to_piece(m.tokenizer.eos_id)
        return {"text": str(rating), "choices": [eos + ratings.PIECES[r] for r in RATING_WORDS], "target": text}
    return {"text": text, "choices": list(RATING_WORDS.values()), "target": str(rating)}


def rated_val_reviews(m: api.Model) -> list[tuple[str, int]]:
    """The negative and positive reviews of the val split `m` was trained on, with their ratings: the checkpoint's
    data source loaded, cleaned and split again as prepare did (the token files keep no rating of an unconditioned
    corpus). A review of digits alone is left out: lm-eval would read it as a choice's number."""
    cfg = OmegaConf.create(m.checkpoint.config)
    corpus = kdata.clean(kdata.load(cfg.data), cfg.data)
    if corpus.labels is None:
        raise UserError(f"kr3_rating needs ratings, and {corpus.source} has no rating column "
                        f"{cfg.data.label_column!r} — leave kr3_rating out of evaluate.tasks")
    val = kdata.split(corpus, cfg.data.val_ratio, cfg.data.test_ratio, cfg.seed)["val"]
    return [(t, r) for t, r in zip(val.texts, val.labels, strict=True) if r in RATING_WORDS and not t.isdigit()]


def val_reviews(m: api.Model) -> list[str]:
    """The reviews of the val split `m` was trained on, as text (each without its rating's control token)."""
    tokens, _, _ = prepared.trained_split(m.checkpoint.data, "val")
    tokens = np.asarray(tokens[: 400 * MAX_ITEMS], dtype=np.int64)  # enough for MAX_ITEMS reviews
    ends = np.flatnonzero(tokens == m.tokenizer.eos_id)
    controls = set(m.checkpoint.condition.ids) if m.checkpoint.condition else set()
    texts = (m.tokenizer.decode([t for t in tokens[a + 1 : b].tolist() if t not in controls])
             for a, b in zip([-1, *ends[:-1]], ends, strict=True))
    return [t for t in texts if t]


def evaluate(m: api.Model, tasks: list[str], include_path: str | None, limit: int | None, batch_size: int,
             path: Path) -> dict:
    """lm-eval's `tasks` on `m` (lm-eval's own, those of YAML files in `include_path`, or the KR3 suite's, written
    beside `path`): lm-eval's results written to `path`, and each task's numeric scores returned ({task: {metric:
    value}})."""
    folders = [include_path] if include_path else []
    if any(task in KR3_TASKS for task in tasks):
        folders.append(str(write_kr3_tasks(m, path.parent / "lm_eval_tasks")))
    manager = TaskManager(include_path=folders or None)
    for task in tasks:
        if task not in manager.all_tasks:
            near = get_close_matches(task, manager.all_tasks, n=3)
            raise UserError(f"evaluate.tasks: {task} is not an lm-eval task"
                            + (f" — did you mean {' or '.join(near)}?" if near else
                               " — name one of lm-eval's (`lm_eval ls tasks`) or give evaluate.include_path"))
    results = simple_evaluate(model=HarnessModel(m, batch_size=batch_size), tasks=list(tasks), task_manager=manager,
                              limit=limit, log_samples=False)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps({k: results[k] for k in ("results", "versions", "n-shot") if k in results},
                                  indent=2, ensure_ascii=False, default=str))
    return {task: {metric: value for metric, value in scores.items() if isinstance(value, int | float)}
            for task, scores in results["results"].items()}
