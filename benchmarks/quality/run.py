"""The quality suite: `tuneloop run` with default settings on each task of benchmarks/quality/tasks.py, and the
headline metrics of the baseline and the fine-tune with their 95 % intervals.

    python benchmarks/quality/run.py                          # the suite's four tasks, into ./quality-runs
    python benchmarks/quality/run.py --tasks sentiment-preferences   # the DPO task (preference pairs)
    python benchmarks/quality/run.py --tasks review-polarity --set train.learning_rate=1e-3

Each task runs the real CLI in a directory of its own (its own registry). For label tasks it also fits a
TF-IDF + logistic-regression classifier on the same train split and scores it on the same test rows: a
reality check of what the text allows. Prints a JSON line per task (its last line: all tasks) with the
baseline's and the fine-tune's headline metrics as [value, low, high], the gate verdict and the wall time.
Outside `make test`; alone on the machine, the whole suite took 58 minutes on 2 CPU cores
with native bf16 (target: under an hour), about 80 on 2 cores without it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import TASKS, Task, write_project  # noqa: E402

TUNELOOP = Path(sys.executable).with_name("tuneloop")


def headline(report: dict) -> list[str]:
    """The metrics a task is judged on: its gate metrics, per-field and label accuracies, item F1."""
    names = list(report["gate_metrics"])
    names += [m for m in report["baseline"] if m == "field_accuracy" or m.endswith((".accuracy", ".macro_f1", ".f1"))
              or m.startswith("field.")]
    if "rouge_l" in report["baseline"]:
        names.append("rouge_l")
    return list(dict.fromkeys(names))


def side(values: dict | None, intervals: dict | None, names: list[str]) -> dict[str, list[float]] | None:
    if values is None:
        return None
    return {m: [round(values[m], 4), *(round(v, 4) for v in (intervals or {}).get(m, [values[m]] * 2))]
            for m in names if m in values and math.isfinite(values[m])}  # NaN: the metric did not apply


def tfidf_check(task: Task, data_dir: Path, resamples: int = 2000) -> dict | None:
    """TF-IDF (word 1-2-grams) + logistic regression trained on the run's train split, accuracy on its test rows."""
    if task.label_field is None:
        return None
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def split(name: str) -> tuple[list[str], list[str]]:
        rows = [json.loads(line)["messages"] for line in (data_dir / f"{name}.jsonl").read_text().splitlines()]
        texts = [m[-2]["content"] for m in rows]
        answers = [m[-1]["content"] for m in rows]
        return texts, answers if not task.label_field else [json.loads(a)[task.label_field] for a in answers]

    (train_x, train_y), (test_x, test_y) = split("train"), split("test")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    classifier = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train_x), train_y)
    correct = (classifier.predict(vectorizer.transform(test_x)) == np.array(test_y)).astype(float)
    rng = np.random.default_rng(0)
    means = correct[rng.integers(0, len(correct), (resamples, len(correct)))].mean(axis=1)
    return {"accuracy": [round(correct.mean(), 4), round(float(np.quantile(means, 0.025)), 4),
                         round(float(np.quantile(means, 0.975)), 4)]}


def run_task(task: Task, work: Path, overrides: list[str]) -> dict:
    project = work / task.name
    config = write_project(task, project)
    started = time.perf_counter()
    command = [str(TUNELOOP), "run", str(config), *(a for o in overrides for a in ("--set", o))]
    with (project / "run.log").open("w") as log:
        done = subprocess.run(command, cwd=project, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    result = {"task": task.name, "shape": task.shape, "exit_code": done.returncode, "wall_s": round(wall, 1),
              "overrides": overrides, "notes": task.notes}
    meta = project / "runs" / task.name / "eval" / "meta.json"
    if not meta.is_file():
        return {**result, "error": f"no evaluation; see {project / 'run.log'}"}
    report = json.loads(meta.read_text())
    data = json.loads((project / "runs" / task.name / "data" / "meta.json").read_text())
    trained = json.loads((project / "runs" / task.name / "train" / "meta.json").read_text())
    names = headline(report)
    return {
        **result,
        "rows": {k: data["counts"][k] for k in ("train", "val", "test")},
        "baseline": side(report["baseline"], report["baseline_ci"], names),
        "fine_tuned": side(report["candidate"], report["candidate_ci"], names),
        "majority_class": {m: round(v, 4) for m, v in report.get("majority", {}).items() if m in names},
        "gate_passed": report["gate_passed"],
        "train": {"val_loss": trained["val_loss"] and round(trained["val_loss"], 4),
                  "seconds": trained["train_seconds"], "tokens": trained["train_tokens"]},
        "tfidf_logreg": tfidf_check(task, project / "runs" / task.name / "data"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(name for name, task in TASKS.items() if task.rejected is None))
    parser.add_argument("--work", type=Path, default=Path("quality-runs"))
    parser.add_argument("--set", action="append", default=[], help="a config override for every task (section.key=value)")
    args = parser.parse_args()
    results = []
    for name in args.tasks.split(","):
        results.append(run_task(TASKS[name], args.work.resolve(), args.set))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"suite": [r["task"] for r in results], "wall_s": round(sum(r["wall_s"] for r in results), 1),
                      "results": results}))


if __name__ == "__main__":
    main()
