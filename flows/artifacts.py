"""What the flows show in the Prefect UI besides their logs: the production run's verdict, metrics and report, and
a tuning study's summary. Figures are embedded as ``data:`` images: the UI cannot follow links to files."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from everest.config import TuningRecord


def artifact_key(kind: str, name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{name}".lower())


def publish_artifacts(summary: dict[str, Any], rows: list[dict[str, Any]], failures: list[dict[str, Any]],
                      n_experiments: int) -> None:
    """The flow run's artifacts: the verdict against the baselines first, the test metrics, the report with
    its figures embedded (the UI cannot follow links to files). Keys name the run, so after a retry its
    latest report is the one the artifact's key shows; descriptions give the attempt and the count."""
    from prefect.context import FlowRunContext

    from everest.analysis import embed_figures

    run = FlowRunContext.get().flow_run
    suffix = artifact_key("", run.name)
    n_done = sum(r["model"] == "everest" for r in rows)
    status = f"{n_done} of {n_experiments} experiments finished; attempt {run.run_count} of flow run {run.name}"
    verdict = summary.get("verdict_rows") or []
    if verdict:
        create_table_artifact(table=[{k: v for k, v in r.items() if k != "sentence"} for r in verdict],
                              key=f"everest-verdict{suffix}",
                              description=f"{status}. " + " ".join(r["sentence"] for r in verdict))
    if rows:
        create_table_artifact(table=[_rounded_row(r) for r in rows], key=f"everest-final-metrics{suffix}",
                              description=f"test metrics per experiment and baseline ({status})")
    report = Path(summary["report"]) if summary.get("report") else None
    text = embed_figures(report.read_text(), report.parent) if report and report.is_file() else "(no report)"
    if failures:  # after the report's first screen, which stays first as in the Markdown file
        first, sep, rest = text.partition("\n## ")
        failed = "## Failed experiments\n\n" + "\n".join(f"* {f['experiment']}: {f['error_type']}: {f['error']}"
                                                          for f in failures)
        text = f"{first}\n{failed}\n{sep}{rest}" if sep else f"{failed}\n\n{text}"
    create_markdown_artifact(markdown=text, key=f"everest-report{suffix}",
                             description=f"EVEREST production report ({status})")


def _rounded_row(row: dict[str, Any]) -> dict[str, Any]:
    """Numbers to 4 decimals for display (the files keep full precision)."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def publish_study(study: Any, record: TuningRecord, recipe: Path) -> None:
    """A tuning study's artifact: the best trials, the optimisation history and the parameters' importance."""
    import optuna

    trials = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                    key=lambda t: t.value, reverse=True)
    rows = ["| trial | mean " + record.metric + " | " + " | ".join(trials[0].params) + " |",
            "|" + "---|" * (len(trials[0].params) + 2)]
    rows += [f"| {t.number} | {t.value:.4f} | " + " | ".join(_short(v) for v in t.params.values()) + " |"
             for t in trials[:10]]
    text = (f"# Tuning study {record.study}\n\n{record.trials} trials finished (complete or pruned) on "
            f"{', '.join(record.targets)}, {record.folds} region folds of the training files; best mean "
            f"{record.metric} {record.best_value:.4f} (trial {record.best_trial}); search space {record.space_hash}."
            f"\n\nRecipe: `{recipe}` (use it with `python -m flows.production --config {recipe}`).\n\n"
            "## Best trials\n\n" + "\n".join(rows) + "\n\n## Optimisation history\n\n"
            f"![history]({_png(_history_figure(study))})\n")
    importance = _importance_figure(study)
    if importance is not None:
        text += f"\n## Parameter importance\n\n![importance]({_png(importance)})\n"
    key = f"everest-tune-{record.study}".lower().replace("_", "-")
    create_markdown_artifact(markdown=text, key=key, description=f"study {record.study}: best {record.best_value:.4f}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _history_figure(study: Any) -> Any:
    import optuna
    from matplotlib.figure import Figure

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    xs, ys = [t.number for t in done], [t.value for t in done]
    ax.plot(xs, ys, "o", label="trial")
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    ax.step(xs, best, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"mean {study.user_attrs.get('metric', 'score')}")
    ax.legend()
    fig.tight_layout()
    return fig


def _importance_figure(study: Any) -> Any:
    import optuna
    from matplotlib.figure import Figure

    try:
        importance = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few trials, or no parameter varied
        return None
    fig = Figure(figsize=(6, 0.4 * len(importance) + 1))
    ax = fig.subplots()
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    fig.tight_layout()
    return fig
