"""KR3's ratings as control, measured: the conditioned model as a sentiment classifier against a TF-IDF character
n-gram + logistic regression baseline trained on the same train split, and how well `rating=` steers
completions (judged by that baseline).

    uv run python bench/rating_control.py --checkpoint RUN_FOLDER [--openings 20 --samples 10 --guidance 1,2,3]

RUN_FOLDER: a run trained with data.condition=rating (e.g. experiment=cpu_15min data.condition=rating). The
classifier's accuracy is what `stage=evaluate` writes into eval.json (run here on the checkpoint's val split);
the baseline reads the same splits again with the checkpoint's data settings (kr3.data: load, clean, split). The
classifier table is headed by the machine (bench/harness.py).
"""

import argparse
import json
from pathlib import Path

import harness
import numpy as np
from omegaconf import OmegaConf
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from kr3 import checkpoint, load
from kr3 import data as kdata

# neutral openings for movie reviews (the shared corpus is NSMC's): no sentiment of their own
OPENINGS = ["이 영화는", "배우들 연기는", "스토리가", "오랜만에 본", "감독의 전작보다", "주인공이", "결말은", "처음 30분은",
            "음악이", "이 장면은", "원작과 비교하면", "극장에서 본", "두 번째 보니", "캐릭터들이", "영상미는", "이 감독",
            "시간 가는 줄", "친구랑 같이 본", "전체적으로", "마지막 장면에서"]


def splits_of(ckpt) -> dict:
    cfg = OmegaConf.create(ckpt.config)
    corpus = kdata.clean(kdata.load(cfg.data), cfg.data)
    return kdata.split(corpus, cfg.data.val_ratio, cfg.data.test_ratio, cfg.seed)


def baseline(splits: dict, classes: list[int]):
    """TF-IDF over character 1–3-grams + logistic regression, on the train reviews rated one of `classes`."""
    train = [(t, r) for t, r in zip(splits["train"].texts, splits["train"].labels) if r in classes]
    val = [(t, r) for t, r in zip(splits["val"].texts, splits["val"].labels) if r in classes]
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), min_df=2, sublinear_tf=True, max_features=300_000)
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(vec.fit_transform([t for t, _ in train]), [r for _, r in train])
    predicted = clf.predict(vec.transform([t for t, _ in val]))
    truth = np.array([r for _, r in val])
    majority = max((truth == c).mean() for c in classes)
    return vec, clf, float((predicted == truth).mean()), float(majority), len(val)


def evaluate(run: Path) -> dict:
    out = run / "evaluate" / "bench-rating"
    harness.run_kr3("stage=evaluate", f"checkpoint={run}", "evaluate.precision=fp32", run_dir=out)
    return json.loads((out / "eval.json").read_text())


def control(run: Path, vec, clf, openings: int, samples: int, guidance: float) -> dict:
    """The share of completions under each rating that the binary baseline judges as that rating."""
    model = load(run, precision="fp32")
    result = {}
    for rating, label in (("negative", 0), ("positive", 1)):
        texts = [f"{o}{c}" for i, o in enumerate(OPENINGS[:openings])
                 for c in model.complete(o, rating=rating, num_samples=samples, seed=i, max_new_tokens=48,
                                         guidance=guidance)]
        judged = clf.predict(vec.transform(texts))
        result[rating] = {"share": float((judged == label).mean()), "completions": len(texts), "examples": texts[:5]}
    texts = [f"{o}{model.complete(o, rating='ambiguous', seed=i, max_new_tokens=48, guidance=guidance)}"
             for i, o in enumerate(OPENINGS)]
    result["ambiguous"] = {"examples": texts[:5]}
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--openings", type=int, default=20)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--guidance", default="1,3", help="comma-separated generate.guidance values to judge")
    a = ap.parse_args()
    ckpt = checkpoint.load(checkpoint.locate(a.checkpoint))
    splits = splits_of(ckpt)
    vec, clf, binary_acc, binary_major, n_binary = baseline(splits, [0, 1])
    _, _, three_acc, three_major, n_three = baseline(splits, [0, 1, 2])
    ours = evaluate(a.checkpoint)
    print(f"val bpc {ours['bpc']:.4f} (control tokens scored too), {ours['rated_bpc']:.4f} (rated reviews, control "
          f"tokens not scored); per rating: {json.dumps(ours['per_rating'], ensure_ascii=False)}")
    cls = ours["classifier"]
    harness.print_table(["classifier", "binary (0/1)", "three ratings"], [
        ["majority class", f"{binary_major:.1%}", f"{three_major:.1%}"],
        ["TF-IDF char 1–3-grams + logistic regression", f"{binary_acc:.1%}", f"{three_acc:.1%}"],
        ["kr3, P(review | rating) · P(rating)", f"{cls['binary (0/1)']['accuracy']:.1%}",
         f"{cls['three ratings']['accuracy']:.1%}"]])
    print(f"(val reviews: {n_binary:,} binary, {n_three:,} all)")
    for guidance in map(float, a.guidance.split(",")):
        steer = control(a.checkpoint, vec, clf, a.openings, a.samples, guidance)
        for rating, r in steer.items():
            share = f"{r['share']:.1%} of {r['completions']} judged {rating}" if "share" in r else "(not judged)"
            print(f"\nguidance {guidance:g}, {rating}: {share}")
            for text in r["examples"]:
                print(f"  - {text}")


if __name__ == "__main__":
    main()
