"""Part 3, model quality on the real Kaggle stroke data split into three hospitals.

The data is split with the seed plan's label skew (:func:`fedrun_cli.demo_data.
split_real_stroke`), each hospital's file is preprocessed and split 70/30 exactly as a
hospital does (:func:`fedrun_trainer.common.data.load_hospital_data`), and then compared:

- centralised logistic regression (scikit-learn, no DP) on all training splits pooled;
- each hospital alone (the same, on its own training split);
- fedrun through the real local runner, without DP and at ε=3 and ε=1.

Every model is scored on the pooled test splits and on each hospital's own test split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from fedrun_cli.demo_data import split_real_stroke
from fedrun_core.api import FederatedRun, load_run
from fedrun_trainer.common.data import Table, load_hospital_data
from fedrun_trainer.common.model import Weights, build_model
from fedrun_trainer.hospital.train import predict_logits
from tests.benchmarks.localrun import (
    LocalRun,
    derive_run,
    display_path,
    example_doc,
    fedrun_local,
    write_run,
)
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult

__all__ = ["VARIANTS", "Scores", "measure_auroc", "scores"]

Probabilities = npt.NDArray[np.float64]
Predictor = Callable[[Table], Probabilities]


@dataclass(frozen=True)
class Scores:
    """AUROC, AUPRC (average precision) and accuracy at a 0.5 threshold."""

    auroc: float
    auprc: float
    accuracy: float
    n: int


def scores(y: npt.NDArray[np.floating], p: Probabilities) -> Scores:
    """Scores of probabilities ``p`` for 0/1 labels ``y``."""
    y = np.asarray(y, dtype=np.float64)
    two_classes = 0 < y.sum() < len(y)
    return Scores(
        auroc=float(roc_auc_score(y, p)) if two_classes else math.nan,
        auprc=float(average_precision_score(y, p)) if two_classes else math.nan,
        accuracy=float(np.mean((p >= 0.5) == (y == 1.0))),
        n=len(y),
    )


def _pool(tables: Sequence[Table]) -> Table:
    return Table(
        np.vstack([t.x for t in tables]),
        np.concatenate([t.y for t in tables]),
        list(tables[0].feature_names),
    )


@dataclass(frozen=True)
class _Hospitals:
    """Each hospital's train and test split, and the run spec they came from."""

    run: FederatedRun
    train: dict[str, Table]
    test: dict[str, Table]

    @property
    def pooled_train(self) -> Table:
        return _pool(list(self.train.values()))

    @property
    def pooled_test(self) -> Table:
        return _pool(list(self.test.values()))


def _load(run: FederatedRun, data_dir: Path) -> _Hospitals:
    spec = run.spec
    train: dict[str, Table] = {}
    test: dict[str, Table] = {}
    for h in spec.hospitals:
        uri = (data_dir / f"{h.name}.{spec.data.format}").resolve().as_uri()
        data = load_hospital_data(uri, spec.data, spec.training.test_fraction, spec.training.seed)
        train[h.name], test[h.name] = data.train, data.test
    return _Hospitals(run, train, test)


@dataclass(frozen=True)
class _Model:
    """A trained model's scores on the pooled test and on each hospital's test split."""

    label: str
    pooled: Scores
    per_hospital: dict[str, Scores]
    epsilon: str = "-"
    target: float | None = None

    @property
    def mean_auroc(self) -> float:
        """Example-weighted mean of the hospitals' AUROCs: the figure fedrun reports."""
        pairs = [(s.auroc, s.n) for s in self.per_hospital.values() if math.isfinite(s.auroc)]
        total = sum(n for _, n in pairs)
        return sum(a * n for a, n in pairs) / total if total else math.nan


def _score_all(label: str, data: _Hospitals, predict: Predictor, **extra: Any) -> _Model:
    """Score ``predict`` on the pooled test splits and on each hospital's test split."""
    per = {name: scores(t.y, predict(t)) for name, t in data.test.items()}
    pooled = data.pooled_test
    return _Model(label, scores(pooled.y, predict(pooled)), per, **extra)


def _sklearn(train: Table) -> Predictor:
    """Logistic regression (scikit-learn defaults: L2, C=1, lbfgs) fitted to ``train``."""
    fitted = LogisticRegression(max_iter=5000).fit(train.x, train.y.astype(int))

    def predict(t: Table) -> Probabilities:
        return np.asarray(fitted.predict_proba(t.x)[:, 1], dtype=np.float64)

    return predict


def _global_model(run: FederatedRun, weights: Weights, n_features: int) -> Predictor:
    """Predictions of fedrun's final global model."""
    model = build_model(run.spec.training, n_features, seed=run.spec.training.seed)

    def predict(t: Table) -> Probabilities:
        return np.asarray(torch.sigmoid(predict_logits(model, weights, t.x)), dtype=np.float64)

    return predict


def _baselines(data: _Hospitals) -> tuple[_Model, dict[str, Scores]]:
    """The centralised model (scored everywhere) and each hospital alone (on its own test)."""
    label = "centralised logistic regression, no DP"
    centralised = _score_all(label, data, _sklearn(data.pooled_train), epsilon="off")
    alone = {
        name: scores(data.test[name].y, _sklearn(train)(data.test[name]))
        for name, train in data.train.items()
    }
    return centralised, alone


@dataclass(frozen=True)
class _Variant:
    """One fedrun run to make: its label, its changes to the example, its AUROC target."""

    label: str
    changes: Mapping[str, Any]
    target: float | None

    @property
    def slug(self) -> str:
        text = self.label.removeprefix("fedrun, ").replace("ε=", "eps")
        return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")

    def epsilon_text(self, spent: float | None) -> str:
        if not self.changes.get("privacy.enabled"):
            return "off"
        return f"{fmt(spent, 2)} of {self.changes['privacy.targetEpsilon']}"


VARIANTS = (
    # Without DP, local epochs cost no privacy: the no-DP run uses three (the DP runs one).
    _Variant(
        "fedrun, no DP, 3 local epochs",
        {"privacy.enabled": False, "training.localEpochs": 3},
        0.845,
    ),
    _Variant("fedrun, ε=3", {"privacy.enabled": True, "privacy.targetEpsilon": 3.0}, None),
    _Variant("fedrun, ε=1", {"privacy.enabled": True, "privacy.targetEpsilon": 1.0}, 0.80),
)


def _run_variant(
    v: _Variant, settings: BenchSettings, data: _Hospitals, data_dir: Path
) -> tuple[_Model | None, LocalRun]:
    """Write the variant's FederatedRun, run it with ``fedrun local`` and score its model."""
    edits = dict(v.changes)
    if settings.rounds is not None:
        edits["rounds"] = settings.rounds
    work = settings.work / "auroc"
    doc = derive_run(example_doc(settings.example), edits)
    result = fedrun_local(write_run(doc, work / f"{v.slug}.yaml"), work / v.slug, data_dir)
    weights = result.final_weights()
    if not result.succeeded or weights is None:
        return None, result
    predict = _global_model(data.run, weights, data.pooled_test.x.shape[1])
    eps = v.epsilon_text(result.epsilon_spent)
    return _score_all(v.label, data, predict, epsilon=eps, target=v.target), result


# --------------------------------------------------------------------------- markdown


def _met(model: _Model) -> str:
    if model.target is None:
        return "-"
    return "yes" if model.pooled.auroc >= model.target else "**no**"


def _summary_table(models: Sequence[_Model]) -> str:
    headers = [
        "Model",
        "ε spent (of target)",
        "AUROC",
        "AUPRC",
        "Accuracy",
        "AUROC, mean of hospitals' own test splits",
        "Target AUROC",
        "Met",
    ]
    rows = [
        [
            m.label,
            m.epsilon,
            fmt(m.pooled.auroc),
            fmt(m.pooled.auprc),
            fmt(m.pooled.accuracy),
            fmt(m.mean_auroc),
            "-" if m.target is None else f"≥ {m.target}",
            _met(m),
        ]
        for m in models
    ]
    return table(headers, rows)


def _count(t: Table) -> str:
    return f"{len(t)} ({t.positives})"


def _pair(s: Scores | None) -> str:
    return "-" if s is None else f"{fmt(s.auroc)} / {fmt(s.auprc)}"


def _hospital_table(data: _Hospitals, alone: dict[str, Scores], models: Sequence[_Model]) -> str:
    headers = ["Hospital", "Train rows (strokes)", "Test rows (strokes)", "alone, no DP"]
    headers += [m.label for m in models]
    rows = [
        [name, _count(data.train[name]), _count(data.test[name]), _pair(alone[name])]
        + [_pair(m.per_hospital.get(name)) for m in models]
        for name in data.test
    ]
    return table(headers, rows)


def _notes(data: _Hospitals, settings: BenchSettings, runs: Sequence[LocalRun]) -> list[str]:
    training = data.run.spec.training
    rounds = settings.rounds or data.run.spec.rounds
    pooled = data.pooled_test
    negatives = 1.0 - pooled.positives / len(pooled)
    n_train = sum(len(t) for t in data.train.values())
    failed = [
        f"- A fedrun run did not succeed: {r.describe_failure()}" for r in runs if not r.succeeded
    ]
    return [
        *failed,
        f"- Data: `{display_path(settings.stroke_csv)}` ({n_train} training "
        f"and {len(pooled)} test rows), split with `split_real_stroke(seed="
        f"{settings.split_seed})`, the same files as `fedrun demo-data DIR --real CSV`.",
        f"- fedrun runs: {rounds} rounds of FedAvg, {training.local_epochs} local epoch(s), "
        f"batch {training.batch_size}, learning rate {training.learning_rate} (as in "
        f"`{settings.example.name}`); each is one run, and DP runs vary from run to run.",
        "- AUROC/AUPRC/Accuracy are on the pooled test splits; fedrun rows score the final "
        'global model (`model.npz`). The "mean of hospitals\' own test splits" column is '
        "what `fedrun local` reports (example-weighted).",
        f"- Accuracy says nothing here: {negatives:.1%} of test patients had no stroke, so "
        f'always answering "no stroke" scores {negatives:.3f}. Judge by AUROC and AUPRC '
        f"(AUPRC of a random guess: {1 - negatives:.3f}).",
    ]


def _skipped(settings: BenchSettings) -> PartResult:
    return PartResult(
        "AUROC on the real stroke data: skipped",
        f"Skipped: `{display_path(settings.stroke_csv)}` is not there (the Kaggle stroke "
        "CSV, not part of the repository). Put it there, or pass `--stroke-csv FILE`, and run "
        f"`{settings.reproduce('auroc')}`.",
    )


def measure_auroc(settings: BenchSettings) -> PartResult:
    """Baselines and fedrun runs on the real data; skipped when the data is absent."""
    if not settings.stroke_csv.is_file():
        return _skipped(settings)
    data_dir = settings.work / "auroc" / "data"
    split_real_stroke(settings.stroke_csv, data_dir, seed=settings.split_seed)
    data = _load(load_run(settings.example), data_dir)
    centralised, alone = _baselines(data)
    outcomes = [_run_variant(v, settings, data, data_dir) for v in VARIANTS]
    fedrun = [m for m, _ in outcomes if m is not None]
    runs = [r for _, r in outcomes]
    body = "\n".join(
        [
            _summary_table([centralised, *fedrun]),
            "",
            f"How to reproduce: `{settings.reproduce('auroc')}`, which runs",
            *[f"  - `{r.command}`" for r in runs],
            "",
            "Each hospital's own test split, AUROC / AUPRC:",
            "",
            _hospital_table(data, alone, [centralised, *fedrun]),
            "",
            f"How to reproduce: `{settings.reproduce('auroc')}`",
            "",
            *_notes(data, settings, runs),
        ]
    )
    return PartResult("AUROC on the real stroke data (3 hospitals, label skew)", body)
