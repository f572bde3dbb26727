"""kr3 as a model of EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra): its three kinds of request
on a loaded kr3.Model — log-likelihoods of continuations (batched), of whole texts (in the context's windows, as
stage=evaluate scores) and greedy completions until a stop string — and `evaluate`, which stage=evaluate runs for
`evaluate.tasks`."""

from __future__ import annotations

import json
import logging
from difflib import get_close_matches
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from kr3 import api
from kr3.atomic import replacing
from kr3.errors import UserError
from kr3.scoring import continuation_scores, token_logprobs

log = logging.getLogger(__name__)


@register_model("kr3")
class HarnessModel(LM):
    """A kr3 checkpoint for lm-eval: `--model kr3 --model_args checkpoint=PATH` on lm-eval's command line, or a
    loaded `model` from Python. Texts are encoded as they are given (no cleaning: a task's formatting is its own);
    every text starts a review, after an end-of-review token."""

    def __init__(self, model: api.Model | None = None, checkpoint: str = "latest", device: str = "auto",
                 precision: str = "auto", batch_size: int | str = 32, **_):
        super().__init__()
        self.m = model if model is not None else api.load(checkpoint, device, precision)
        self.batch = int(batch_size) if str(batch_size).isdigit() else 32  # lm-eval's "auto": kr3's default

    def ids(self, text: str) -> list[int]:
        return self.m.tokenizer.encode(text) if text else []

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        eos = self.m.tokenizer.eos_id
        rows = [([eos, *self.ids(context)], self.ids(continuation)) for context, continuation in (r.args for r in requests)]
        return continuation_scores(self.m.model, rows, self.batch, self.m.device, self.m.dtype)

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


def evaluate(m: api.Model, tasks: list[str], include_path: str | None, limit: int | None, batch_size: int,
             path: Path) -> dict:
    """lm-eval's `tasks` on `m` (lm-eval's own, or those of YAML files in `include_path`): lm-eval's results written
    to `path`, and each task's numeric scores returned ({task: {metric: value}})."""
    manager = TaskManager(include_path=include_path)
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
