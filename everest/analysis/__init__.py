"""Statistical analysis, plots and report over the experiments of a results root.

Entry points: :class:`ProductionAnalyzer` (notebook), :func:`run_analysis` (returns a JSON-able summary: what
a Prefect task wraps) and ``python -m everest.analysis`` (command line). Sub-modules: ``loading`` (what a
results root holds), ``stats`` (seed statistics, region-block bootstrap, tests), ``analyzer`` (computes every
table and figure, writes nothing), ``plots``, ``report`` (the report's text), ``writing`` (writes the CSVs,
plots, report and summary JSON). The seed ensembles are built before the analysis
(:func:`everest.scoring.ensemble.build_ensembles`, ``everest ensemble``); the analysis reads them, and its
report says which targets have none and why (e.g. not built).
:func:`embed_figures` turns the report (whose figures are links to ``../plots/*.png``) into self-contained
Markdown for the Prefect UI.

The report opens with the verdict against the simple baselines of :mod:`everest.scoring.baselines` (every
``<out>/baselines/<model>/results`` found): per target, EVEREST against the baseline with the best validation
TSS, paired on seeds and test samples, with Holm-corrected p-values (also ``analysis/verdict.csv`` and
``AnalysisSummary.verdict``).

Stale results: finished results of another config hash, code version or data files than the run's (the one
most results share) are named in the report and left out of the statistics (averaging them would describe no
configuration). Failed, missing, stale and unexpected experiments never stop the analysis: they are listed
first in the report.
"""

from everest.analysis.analyzer import (
    SUMMARY_METRICS,
    ProductionAnalyzer,
    compare_result_sets,
    run_analysis,
)
from everest.analysis.inline import embed_figures
from everest.analysis.loading import (
    AnalysisError,
    ExperimentResult,
    FailedExperiment,
    ResultSet,
    load_results,
)
from everest.analysis.writing import PLOT_FILES, AnalysisSummary

__all__ = [
    "PLOT_FILES",
    "SUMMARY_METRICS",
    "AnalysisError",
    "AnalysisSummary",
    "ExperimentResult",
    "FailedExperiment",
    "ProductionAnalyzer",
    "ResultSet",
    "compare_result_sets",
    "embed_figures",
    "load_results",
    "run_analysis",
]
