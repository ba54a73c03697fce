"""Write an analysis to disk: the CSVs, plots, report and summary JSON of a :class:`ProductionAnalyzer`.

The analyzer computes (tables, statistics, figures, the report's text) and writes nothing; this module writes
what it computed, under ``<out>/analysis`` and ``<out>/plots``, every file atomically.
:meth:`ProductionAnalyzer.run_complete_analysis` and :func:`everest.analysis.run_analysis` (the entry point)
call :func:`write_analysis`. A run that makes plots leaves under ``plots/`` only its own figures
(:func:`remove_stale_plots`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from everest import io
from everest.analysis import plots, report
from everest.analysis import stats as st
from everest.config import all_targets
from everest.results import verdict_file

if TYPE_CHECKING:
    from everest.analysis.analyzer import ProductionAnalyzer

log = logging.getLogger(__name__)

PLOT_FILES: dict[str, str] = {
    "verdict": "verdict_forest.png",
    "performance": "production_performance_analysis.png",
    "detailed": "detailed_metrics_analysis.png",
    "threshold": "threshold_analysis.png",
    "latency": "latency_analysis.png",
    "reliability": "reliability_diagrams.png",
    "roc_pr": "roc_pr_curves.png",
    "training": "training_curves.png",
}
# Per-target reliability diagrams (ensemble and baselines): ``reliability_<target>.png``.
RELIABILITY_FILE = "reliability_{}.png"


def owned_plot_files() -> set[str]:
    """Every file name an analysis may write under ``plots/``: the only files it ever removes there."""
    return set(PLOT_FILES.values()) | {RELIABILITY_FILE.format(t) for t in all_targets()}


@dataclass
class AnalysisSummary:
    """What one analysis produced: file paths, coverage and the per-target headline numbers (JSON-able)."""

    report: str
    raw_results: str
    summary_statistics: str
    plots: dict[str, str]
    plot_panels: dict[str, int]
    n_expected: int
    n_completed: int
    n_failed: int
    n_missing: int
    n_stale: int
    failed: list[str]
    missing: list[str]
    unexpected: list[str]
    stale: dict[str, str]  # experiment name -> why it is not the run's result (left out of the statistics)
    targets: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    n_bootstrap: int
    seed: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    # The verdict against the simple baselines (the report's first section): one row per expected target
    # (columns: everest.analysis.analyzer.VERDICT_COLUMNS plus ``tss_<model>``/``val_tss_<model>`` per
    # baseline); empty when no baseline results exist. ``baselines``: model name -> results root;
    # ``verdict_file``: verdict.csv.
    verdict: list[dict[str, Any]] = field(default_factory=list)
    baselines: dict[str, str] = field(default_factory=dict)
    verdict_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (NaN as None) for Prefect artifacts and ``analysis_summary.json``, with the
        verdict's display rows (``verdict_rows``)."""
        return {**jsonable(asdict(self)), "verdict_rows": self.verdict_table()}

    def table(self) -> list[dict[str, Any]]:
        """Per-target means as rows of a table (e.g. a Prefect table artifact)."""
        return jsonable(self.targets)

    def verdict_table(self) -> list[dict[str, Any]]:
        """The verdict as display rows (3 decimals, p-values to 2 significant digits below 0.001): the table
        to publish first, e.g. as a Prefect table artifact. Empty when no baseline results exist."""
        rows = []
        for row in jsonable(self.verdict):
            low, high = row.get("everest_tss_t_ci_low"), row.get("everest_tss_t_ci_high")
            if low is not None and high is not None:  # shown within TSS's range, as the report does
                low, high, clipped = st.clip_to_range("tss", low, high)
                row.update(everest_tss_t_ci_low=low, everest_tss_t_ci_high=high, everest_tss_t_ci_clipped=clipped)
            rows.append({k: _rounded(k, v) for k, v in row.items()})
        return rows


def _rounded(key: str, value: Any) -> Any:
    if not isinstance(value, float):
        return value
    if (key.startswith("p_") or key.endswith("_p_holm")) and 0 < value < 0.001:
        return float(f"{value:.2g}")
    return round(value, 4 if "brier" in key else 3)  # Brier scores differ in the fourth decimal


def jsonable(obj: Any) -> Any:
    """``obj`` with plain JSON values: numpy scalars as Python numbers, NaN and infinities as None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def save_plots(a: ProductionAnalyzer) -> tuple[dict[str, str], dict[str, int]]:
    """Render and write every figure of ``a`` (PNG, atomically); return paths and panel counts by key."""
    paths, panels = {}, {}
    for key, fig in a.figures().items():
        paths[key], panels[key] = str(_save_png(fig, a.plots_dir / PLOT_FILES[key])), len(fig.axes)
    return paths, panels


def save_reliability_plots(a: ProductionAnalyzer) -> dict[str, str]:
    """Write one reliability diagram per target with an ensemble (:meth:`ProductionAnalyzer.reliability_curves`);
    paths by ``reliability_<target>`` key."""
    paths = {}
    for t, curves in a.reliability_curves().items():
        fig = plots.reliability_curves_figure(curves, f"{t}: reliability on test")
        paths[f"reliability_{t}"] = str(_save_png(fig, a.plots_dir / RELIABILITY_FILE.format(t)))
    return paths


def _save_png(fig: Any, path: Path) -> Path:
    return io.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def remove_stale_plots(plots_dir: Path, written: Sequence[str | Path]) -> list[Path]:
    """Delete the plots an earlier analysis left under ``plots_dir`` that this one did not write (e.g. the
    reliability diagram of a target no longer analysed), so every figure there is this analysis'.
    Only :func:`owned_plot_files` names are touched; returns the deleted paths."""
    keep = {Path(p).name for p in written}
    stale = sorted(plots_dir / name for name in owned_plot_files() - keep if (plots_dir / name).is_file())
    for path in stale:
        path.unlink()
        log.info("removed %s: a plot of an earlier analysis", path)
    return stale


def write_analysis(a: ProductionAnalyzer) -> AnalysisSummary:
    """Write everything ``a`` computes: plots (unless ``a.make_plots`` is off), the CSVs, the report and
    ``analysis_summary.json``; return the summary."""
    started = time.perf_counter()
    rs = a.results
    plot_paths, panels = save_plots(a) if a.make_plots else ({}, {})
    if a.make_plots:
        plot_paths.update(save_reliability_plots(a))
        remove_stale_plots(a.plots_dir, list(plot_paths.values()))
    io.write_csv(a.analysis_dir / "ensemble.csv", a.ensemble_table)
    raw_path = io.write_csv(a.analysis_dir / "raw_results.csv", a.raw_results)
    summary_path = io.write_csv(a.analysis_dir / "summary_statistics.csv", a.summary_statistics)
    comparisons = pd.concat([a.horizon_comparisons, a.baseline_comparisons], ignore_index=True)
    if len(comparisons):
        io.write_csv(a.analysis_dir / "significance_tests.csv", comparisons)
    if len(a.threshold_stability):
        io.write_csv(a.analysis_dir / "threshold_stability.csv", a.threshold_stability)
        io.write_csv(a.analysis_dir / "threshold_protocol_comparison.csv", a.protocol_inflation)
    verdict_path = io.write_csv(verdict_file(a.out_dir), a.verdict) if len(a.verdict) else None
    report_path = a.analysis_dir / "production_training_report.md"
    rel_plots = {k: str(Path("..") / "plots" / Path(p).name) for k, p in plot_paths.items()}
    io.write_text(report_path, report.render(a, rel_plots))
    warn = [f"{name}: stale, not in the statistics ({why})" for name, why in rs.stale.items()]
    summary = AnalysisSummary(
        report=str(report_path), raw_results=str(raw_path), summary_statistics=str(summary_path),
        plots=plot_paths, plot_panels=panels, n_expected=len(rs.expected), n_completed=len(rs.analysed),
        n_failed=sum(f.expected for f in rs.failed), n_missing=len(rs.missing), n_stale=len(rs.stale),
        failed=[f.name for f in rs.failed], missing=[e.name for e in rs.missing],
        unexpected=[r.name for r in rs.unexpected], stale=rs.stale, targets=a.target_table(),
        comparisons=comparisons.to_dict("records") if len(comparisons) else [],
        n_bootstrap=a.n_bootstrap, seed=a.seed, seconds=time.perf_counter() - started, warnings=warn,
        verdict=a.verdict.to_dict("records"), baselines={m: str(p) for m, p in a.baseline_models.items()},
        verdict_file=str(verdict_path) if verdict_path else None)
    io.write_json(a.analysis_dir / "analysis_summary.json", summary.to_dict())
    log.info("analysis of %d/%d experiments written to %s in %.1f s", summary.n_completed, summary.n_expected,
             report_path, summary.seconds)
    return summary
