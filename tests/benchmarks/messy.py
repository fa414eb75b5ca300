"""Part ``messy``: the real stroke data as real hospitals export it, against the same rows clean.

Four hospitals from the Kaggle table (:mod:`tests.messydata`): one with 20 % of glucose
empty, one writing ``Male``/``male ``/``M``, one with ``?`` for missing, one with an extra
column and its columns reordered. The same FederatedRun (the demo's, with the stroke
features as a spec list and declared policies: glucose imputed with an indicator, aliases
for gender) runs once on the messy files and once on the same rows unchanged. The report
gives the AUROC of each (the mean of the hospitals' own and the pooled one) and the
per-hospital counts of what the policies did, as the run's status carries them.
"""

from __future__ import annotations

from fedrun_local.report import data_counts_rows
from tests.benchmarks.localrun import LocalRun, derive_run, example_doc, fedrun_local, write_run
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult
from tests.messydata import DECLARED, write_messy_hospitals

__all__ = ["measure_messy"]


#: Runs of each variant: DP noise moves one run's AUROC by a few hundredths.
REPEATS = 3


def _run(settings: BenchSettings, label: str, inject: bool, repeat: int) -> LocalRun:
    base = settings.work / "messy" / label / str(repeat)
    files = write_messy_hospitals(settings.stroke_csv, base / "data", inject=inject)
    changes: dict[str, object] = {
        "data": {"format": "csv", "targetColumn": "stroke", "features": DECLARED},
        "minHospitals": len(files.paths),
        "hospitals": [
            {"name": name, "dataUri": f"file:{name}.csv"} for name in sorted(files.paths)
        ],
    }
    if settings.rounds is not None:
        changes["rounds"] = settings.rounds
    doc = derive_run(example_doc(settings.example), changes)
    doc["metadata"]["name"] = f"stroke-{label}"
    run_file = write_run(doc, base / "run.yaml")
    return fedrun_local(run_file, base / "out", base / "data")


def measure_messy(settings: BenchSettings) -> PartResult:
    """The messy run and its clean twin; skipped when the real data is absent."""
    if not settings.stroke_csv.is_file():
        return PartResult(
            "Messy real tables: skipped",
            f"Skipped: `{settings.stroke_csv}` is not there. Run "
            f"`{settings.reproduce('messy')}` with the Kaggle stroke CSV in place.",
        )
    repeats = 1 if settings.quick else REPEATS
    runs = {
        label: [_run(settings, label, inject, i) for i in range(repeats)]
        for label, inject in (("clean", False), ("messy", True))
    }
    rows = []
    for label, done in runs.items():
        for i, run in enumerate(done, start=1):
            metrics = run.metrics
            rows.append(
                [
                    f"{label} #{i}",
                    run.phase,
                    fmt(metrics.get("auroc")),
                    fmt(metrics.get("pooledAuroc")),
                    fmt(run.epsilon_spent),
                    f"{run.wall_s:.0f}",
                ]
            )
        pooled = [r.metrics.get("pooledAuroc") for r in done]
        means = [float(p) for p in pooled if p is not None]
        if means:
            rows.append(
                [f"**{label}, mean**", "", "", f"**{sum(means) / len(means):.3f}**", "", ""]
            )
    counts = data_counts_rows(runs["messy"][0].status)
    body = "\n".join(
        [
            table(
                ["files", "phase", "AUROC (mean of hospitals')", "pooled AUROC", "ε", "wall s"],
                rows,
            ),
            "",
            "What the declared policies did at each hospital of the first messy run (the run's "
            "`status.hospitals[].data`, counts only):",
            "",
            table(["hospital", "rows", "used", "dropped", "columns"], counts),
            "",
            f"How to reproduce: `{settings.reproduce('messy')}`, which runs",
            *[f"  - `{done[0].command}` (and the same for each repeat)" for done in runs.values()],
            "",
            "The defects (tests/messydata.py): hospital-a has 20 % of `avg_glucose_level` "
            "empty; hospital-b writes `gender` as `Male`, `male ` or `M` (and so for Female); "
            "hospital-c writes `?` for every missing value; hospital-d has an extra free-text "
            "column and its columns in reverse order. The spec declares `missing: impute, "
            "fill: 90, indicator: true` for glucose and `aliases: {M: Male, F: Female}` for "
            "gender; everything else is the stroke preset's. The clean run reads the same "
            "rows unchanged with the same spec. 4 hospitals, 5 rounds, ε = 1, logistic model; "
            f"{repeats} runs of each, since DP-SGD draws fresh noise every run.",
        ]
    )
    return PartResult(
        "Messy real tables (4 hospitals, one defect each) against the same rows clean", body
    )
