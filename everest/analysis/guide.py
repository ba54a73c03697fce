"""The report's last section, "How to read this report": how every number is chosen, computed and tested.

The report's first screen links here, so the method text never stands between a reader and the verdict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from everest.analysis.stats import CLIPPED, MIN_T_SEEDS

if TYPE_CHECKING:
    from everest.analysis.analyzer import ProductionAnalyzer


def intervals_note(a: ProductionAnalyzer) -> str:
    """How the report's intervals are shown."""
    return (f"Every interval is a {int(round(a.confidence * 100))} % interval printed with what it is and its n: "
            "*t* is the Student-t interval of the seed mean over n seeds (training randomness), *bootstrap* the "
            "percentile interval from a region-block bootstrap of the test set over n active regions (or day-long "
            "row blocks where no region is recorded). A t-interval is cut to the metric's range (TSS in [-1, 1]; "
            f"rates, AUC, Brier and ECE in [0, 1]; times ≥ 0), marked *{CLIPPED}* where that happened; with fewer "
            f"than {MIN_T_SEEDS} seeds it says nothing, and the bootstrap interval is shown instead where one "
            "exists.\n")


def how_to_read(a: ProductionAnalyzer) -> list[str]:
    """The method text of every section, in the sections' order."""
    conf = int(round(a.confidence * 100))
    alpha = f"{1 - a.confidence:.2f}"
    e = a.ensemble_table
    built = e[e["note"] == ""] if len(e) else e
    methods = ", ".join(sorted(set(built["calibration"]))) if len(built) else "none built"
    return [
        "## How to read this report\n",
        "Decision thresholds are chosen on the validation split; test-oracle values are shown only as a labelled "
        "reference.\n",
        "**The verdict.** **Best baseline** of a target: the baseline with the highest mean **validation** TSS over "
        "its seeds (ties: model name), so the choice never sees test data. Test TSS and Brier: means over seeds. "
        f"EVEREST's t-CI: {conf} % Student-t interval over seeds; bootstrap CI: region-block bootstrap of the "
        "seed mean. **ΔTSS**: EVEREST minus the best baseline, mean over the seeds both have, paired on test "
        "samples; its CI: paired region bootstrap; p: paired region permutation test, Holm-corrected over "
        f"the targets. **Verdict**: *beats* when the CI lies above 0 and the Holm p is below {alpha}, "
        f"*trails* when it lies below 0 and the Holm p is below {alpha}, else *ties*. The verdict figure shows "
        "each target's ΔTSS with that interval and a line at zero (filled: Holm-significant) and, beside it, the "
        "seed ensemble's ΔTSS (one model: a point, no interval).\n",
        "**Intervals.** " + intervals_note(a),
        "**Calibration and the ensemble.** Every model's probabilities are **calibrated** on the validation split "
        f"before the threshold search ({methods}); Brier score and ECE are shown raw and calibrated, on test. The "
        "**ensemble** averages its seeds' raw probabilities; the seeds share one validation split, so its "
        "calibration and threshold are fitted on regions none of its members trained on (and the seed intervals "
        "describe training randomness only, not the choice of validation regions). Thresholds are searched on "
        f"the raw scores and shown on the calibrated scale. TSS CI: region-block bootstrap ({conf} %).\n",
        f"**Per-target results.** Mean ± sample std (ddof = 1) over seeds; **t-CI**: {conf} % Student-t confidence "
        "interval of the seed mean (training randomness; undefined for one seed). **Bootstrap CI**: "
        f"{conf} % percentile interval of the seed-mean score from a region-block bootstrap of the test set "
        f"({a.n_bootstrap:,} resamples of whole active regions, seed {a.seed}): how much the score depends on "
        "which regions fell in the test period. Rows of one region are near-duplicates (9 of 10 time steps "
        "shared), so regions, not rows, are the independent units.\n",
        "**Horizon comparisons.** Difference of seed-mean test TSS, A minus B (positive: A better). Two-level "
        f"bootstrap, {a.n_bootstrap:,} resamples: active regions drawn once from the union of both test sets "
        "and applied to both (they share regions), seeds resampled within each arm. p: two-sided bootstrap "
        "p-value for a zero difference; Holm-corrected over all horizon comparisons (family-wise "
        f"α = {alpha}). Effect sizes: the TSS difference and Hedges' g over the seeds' scores.\n",
        "**Candidate vs baseline** (with `--baseline DIR`): candidate minus baseline seed-mean TSS, seeds paired by "
        "number, same test samples. CI: paired region bootstrap; p: paired region permutation test (each "
        "region's predictions swapped between the models at random); Holm over targets. Effect sizes: ΔTSS and "
        "Cohen's d_z over the per-seed differences.\n",
        "**Protocol inflation.** Our protocol picks the threshold on the validation split. The first implementation "
        "tuned it on the test set (the *oracle*); the difference (oracle minus validation-chosen, mean over seeds) "
        "is how much that protocol inflates each reported metric.\n",
    ]
