"""EleutherAI's lm-evaluation-harness on kr3, both ways: its local-completions model against stage=serve on loopback
(the server lends it the tokenizer), and in this process through kr3.harness (stage=evaluate evaluate.tasks=...), on
a multiple-choice task of lm-eval's own format read from a local file."""

import json

import pytest

import kr3
from kr3 import serve

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the eval extra and the dev group: uv sync installs it")
from kr3.harness import HarnessModel  # noqa: E402 — imported first: lm-eval's own models must still load after it

TASK = """\
task: kr3_test_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
ITEMS = [{"context": c, "choices": ch, "label": 0} for c, ch in [
    ("이 집 짜장면은", ["정말 맛있어요", "다시는 안 가요 ㅠㅠ", "양이 많아요"]),
    ("사장님", ["친절해요", "짜장면", "분위기가 좋아요"]),
    ("여기 냉면", ["너무 짜요", "최고입니다!", "또 올게요"]), ("우리 동네 식당", ["가격이 착해요", "ㅋㅋ", "별로였어요"])]]


@pytest.fixture(scope="module")
def model(served_run):
    return kr3.load(served_run, device="cpu", precision="fp32")


@pytest.fixture
def task_folder(tmp_path, monkeypatch):
    """A folder holding the task's YAML file and its items (JSON lines); no Hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ITEMS), encoding="utf-8")
    (tmp_path / "task.yaml").write_text(TASK.format(items=tmp_path / "items.jsonl"), encoding="utf-8")
    return tmp_path


def accuracy(m, items=ITEMS) -> float:
    """A multiple-choice task's accuracy as Model.logprobs scores it: each item's likeliest choice after its context,
    read as it is (as lm-eval's models read a context that is not empty)."""

    def likelihood(context: str, choice: str) -> float:
        ids = m.tokenizer.encode(context)
        return sum(e["logprob"] for e in m.logprobs([*ids, *m.tokenizer.encode(" " + choice)])[len(ids):])

    return sum(max(range(len(i["choices"])), key=lambda k: likelihood(i["context"], i["choices"][k])) == i["label"]
               for i in items) / len(items)


@pytest.mark.e2e
def test_lm_eval_scores_a_task_through_the_server(model, live_server, task_folder):
    from lm_eval.tasks import TaskManager

    base = live_server(serve.app(model))
    results = lm_eval.simple_evaluate(model="local-completions", tasks=["kr3_test_choice"],
                                      model_args=f"base_url={base}/v1/completions,model=kr3,max_length=64",
                                      task_manager=TaskManager(include_path=str(task_folder)), log_samples=False)
    assert results["results"]["kr3_test_choice"]["acc,none"] == pytest.approx(accuracy(model))


@pytest.mark.e2e
def test_stage_evaluate_runs_lm_eval_tasks_in_process(model, served_run, task_folder, tmp_path, run_kr3):
    proc = run_kr3(f"paths.root_dir={tmp_path}", "stage=evaluate", f"checkpoint={served_run}", "evaluate.precision=fp32",
                   "evaluate.tasks=[kr3_test_choice]", f"evaluate.include_path={task_folder}",
                   f"hydra.run.dir={tmp_path / 'e'}")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert scores["tasks"]["kr3_test_choice"]["acc,none"] == pytest.approx(accuracy(model))
    assert "kr3_test_choice" in json.loads((tmp_path / "e" / "lm_eval.json").read_text())["results"]
    wrong = run_kr3(f"paths.root_dir={tmp_path}", "stage=evaluate", f"checkpoint={served_run}",
                    "evaluate.tasks=[kr3_test_choise]", f"evaluate.include_path={task_folder}")
    assert wrong.returncode == 2 and "kr3_test_choise is not an lm-eval task — did you mean kr3_test_choice" in wrong.stderr


def test_the_harness_model_scores_what_the_server_scores(model):
    """Batched continuations (padded on the right) give each row's numbers alone, and greediness."""
    harness = HarnessModel(model, batch_size=3)
    requests = [type("R", (), {"args": (i["context"], " " + c)})() for i in ITEMS for c in i["choices"]]
    together = harness.loglikelihood(requests)
    alone = [HarnessModel(model, batch_size=1).loglikelihood([r])[0] for r in requests]
    assert [g for _, g in together] == [g for _, g in alone]
    assert [s for s, _ in together] == pytest.approx([s for s, _ in alone], abs=1e-4)
    eos = model.tokenizer.eos_id
    text = ITEMS[0]["context"]
    rolling = harness.loglikelihood_rolling([type("R", (), {"args": (text,)})()])[0]
    assert rolling == pytest.approx(sum(e["logprob"] for e in model.logprobs([eos, *model.tokenizer.encode(text)])[1:]),
                                    abs=1e-4)


@pytest.mark.e2e
def test_the_kr3_task_suite_is_written_from_the_val_reviews_and_scored(model, served_run, tmp_path, run_kr3):
    """kr3_cloze: each val review's opening with its ending among three others'; kr3_bpc: each review scored whole
    from its start. Both read files kr3 writes into the evaluation's folder, which lm-eval's CLI can include too."""
    import math

    proc = run_kr3(f"paths.root_dir={tmp_path}", "stage=evaluate", f"checkpoint={served_run}", "evaluate.precision=fp32",
                   "evaluate.tasks=[kr3_cloze,kr3_bpc]", "evaluate.limit=40", f"hydra.run.dir={tmp_path / 'e'}",
                   env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads((tmp_path / "e" / "eval.json").read_text())["tasks"]
    folder = tmp_path / "e" / "lm_eval_tasks"
    items = [json.loads(line) for line in (folder / "kr3_cloze.jsonl").read_text().splitlines()][:40]
    assert all(len(i["choices"]) == 4 and len(set(i["choices"])) == 4 for i in items)
    assert tasks["kr3_cloze"]["acc,none"] == pytest.approx(accuracy(model, items))
    reviews = [json.loads(line)["text"] for line in (folder / "kr3_bpc.jsonl").read_text().splitlines()][:40]
    eos = model.tokenizer.eos_id
    nats = -sum(e["logprob"] for r in reviews for e in model.logprobs([eos, *model.tokenizer.encode(r)])[1:])
    expected = nats / math.log(2) / sum(len(r.encode()) for r in reviews)
    assert tasks["kr3_bpc"]["bits_per_byte,none"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("run", ["served_run", "rated_run"])
def test_kr3_rating_reads_a_rating_as_each_kind_of_model_can(run, request, tmp_path, run_kr3):
    """An unconditioned model: the likelier rating word after the review; a conditioned one: the rating under whose
    control token the review is likelier. The items are the val split's negative and positive reviews, their ratings
    the corpus's (a conditioned model's val tokens hold them too: they agree)."""
    from kr3 import classify, prepared

    checkpoint = request.getfixturevalue(run)
    m = kr3.load(checkpoint, device="cpu", precision="fp32")
    proc = run_kr3(f"paths.root_dir={tmp_path}", "stage=evaluate", f"checkpoint={checkpoint}", "evaluate.precision=fp32",
                   "evaluate.tasks=[kr3_rating]", "evaluate.limit=30", f"hydra.run.dir={tmp_path / 'e'}",
                   env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "e" / "lm_eval_tasks" / "kr3_rating.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines][:30]

    def likelihood(context: str, continuation: str) -> float:
        ids = m.token_ids(context) or [m.tokenizer.eos_id]
        return sum(e["logprob"] for e in m.logprobs([*ids, *m.token_ids(continuation)])[len(ids):])

    conditioned = m.ratings is not None
    if conditioned:  # one context per rating, the review after each
        gold = [int(i["text"]) for i in items]
        scores = [[likelihood(c, i["target"]) for c in i["choices"]] for i in items]
        tokens, _, _ = prepared.trained_split(m.checkpoint.data, "val")
        rated = {tuple(ids): r for r, ids in classify.reviews_of(tokens, m.tokenizer.eos_id,
                                                                 m.checkpoint.condition.controls)}
        assert [rated[tuple(m.tokenizer.encode(i["target"]))] for i in items] == gold
    else:  # the review, then each rating's words
        gold = [int(i["target"]) for i in items]
        scores = [[likelihood(i["text"], c) for c in i["choices"]] for i in items]
    expected = sum(max(range(2), key=row.__getitem__) == g for row, g in zip(scores, gold)) / len(items)
    assert {0, 1} == set(gold) and all(len(i["choices"]) == 2 for i in items)
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["tasks"]["kr3_rating"]["acc,none"] == \
        pytest.approx(expected)


def test_evaluate_tasks_without_lm_eval_installed_is_one_line(run_kr3, served_run, tmp_path, monkeypatch):
    """kr3[eval] not installed: the stage says how to get it, before loading anything."""
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "kr3.harness")
    monkeypatch.delattr(kr3, "harness")
    proc = run_kr3(f"paths.root_dir={tmp_path}", "stage=evaluate", f"checkpoint={served_run}",
                   "evaluate.tasks=[kr3_cloze]")
    assert proc.returncode == 2, proc.stderr
    assert "evaluate.tasks needs lm-eval — pip install 'kr3[eval]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(served_run.glob("evaluate/*/eval.json"))  # stopped before scoring anything
