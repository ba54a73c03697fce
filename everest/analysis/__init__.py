"""Statistical analysis, plots and report over the experiments of a results root (issue 5).

Entry points: :class:`ProductionAnalyzer` (notebook), :func:`run_analysis` (returns a JSON-able summary: what
a Prefect task wraps) and ``python -m everest.analysis`` (command line). Sub-modules: ``loading`` (what a
results root holds), ``stats`` (seed statistics, region-block bootstrap, tests), ``plots``, ``report``.

Mixed configurations: if one target holds results of different config hashes or data files, the analysis stops
with :class:`MixedResultsError` naming them (averaging them would describe no configuration); pass
``on_mixed="warn"`` (CLI ``--allow-mixed``) to analyse them anyway with a warning at the top of the report.
Failed, missing and unexpected experiments never stop the analysis: they are listed first in the report.
"""

from everest.analysis.analyzer import (
    PLOT_FILES,
    SUMMARY_METRICS,
    AnalysisSummary,
    ProductionAnalyzer,
    compare_result_sets,
    run_analysis,
)
from everest.analysis.loading import (
    AnalysisError,
    ExperimentResult,
    FailedExperiment,
    MixedResultsError,
    ResultSet,
    load_results,
)

__all__ = [
    "PLOT_FILES",
    "SUMMARY_METRICS",
    "AnalysisError",
    "AnalysisSummary",
    "ExperimentResult",
    "FailedExperiment",
    "MixedResultsError",
    "ProductionAnalyzer",
    "ResultSet",
    "compare_result_sets",
    "load_results",
    "run_analysis",
]
