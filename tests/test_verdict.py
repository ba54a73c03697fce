"""The report's verdict against the simple baselines, on results roots written to disk without training.

EVEREST's results go to ``<out>/results`` and each baseline's to ``<out>/baselines/<model>/results`` (the layout
of :mod:`everest.scoring.baselines`); test predictions share labels and regions, so every comparison is paired. Expected
numbers are recomputed here from the predictions or the written tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis import region_data, write_experiment

from everest.analysis import ProductionAnalyzer
from everest.analysis.__main__ import main as cli_main
from everest.analysis.analyzer import VERDICT_COLUMNS
from everest.analysis.report import _p
from everest.scoring import baselines as B
from everest.scoring import metrics as M

N_BOOT = 1000
SEEDS = [0, 1, 2]


def preds(target_seed: int, skill: float) -> pd.DataFrame:
    """Test predictions; the same ``target_seed`` gives the same labels and regions whatever the skill."""
    return region_data(np.random.default_rng(target_seed), skill=skill)


def sharp(pred: pd.DataFrame) -> pd.DataFrame:
    """A near-perfect forecaster on the same test samples."""
    return pred.assign(y_prob=pred["y_true"] * 0.8 + 0.1)


def baseline_results(out: Path, model: str) -> Path:
    return B.baseline_root(out, model) / "results"


def tss(pred: pd.DataFrame) -> float:
    return M.evaluate(pred["y_true"], pred["y_prob"], 0.5)["tss"]


def verdict_section(report: str) -> str:
    return report.split("## Verdict: EVEREST against simple baselines\n")[1].split("\n## ")[0]


def analyse(out: Path, targets: list[str], **kwargs) -> tuple[ProductionAnalyzer, object]:
    a = ProductionAnalyzer(out / "results", targets=targets, seeds=SEEDS, n_bootstrap=N_BOOT, make_plots=False,
                           **kwargs)
    return a, a.run_complete_analysis()


@pytest.fixture
def tie_root(tmp_path) -> Path:
    """M-24: EVEREST clearly better than `logistic` (no skill) and equal to `boosted` on test (same
    predictions); validation TSS: boosted 0.60, logistic 0.40."""
    for s in SEEDS:
        good = preds(s, 0.3)
        write_experiment(tmp_path / "results", "M-24", s, good)
        write_experiment(baseline_results(tmp_path, "boosted"), "M-24", s, good, config_hash="b", val_tss=0.6)
        write_experiment(baseline_results(tmp_path, "logistic"), "M-24", s, preds(s, 0.0), config_hash="l",
                         val_tss=0.4)
    return tmp_path


def test_best_baseline_is_chosen_on_validation_and_equal_skill_ties(tie_root):
    a, summary = analyse(tie_root, ["M-24"])
    assert list(a.baseline_models) == ["boosted", "logistic"]  # found under <out>/baselines, sorted
    assert summary.baselines == {m: str(baseline_results(tie_root, m)) for m in ("boosted", "logistic")}
    [row] = summary.verdict
    everest = np.mean([tss(preds(s, 0.3)) for s in SEEDS])
    logistic = np.mean([tss(preds(s, 0.0)) for s in SEEDS])
    assert everest - logistic > 0.3  # EVEREST clearly beats logistic on test ...
    assert row["everest_tss"] == pytest.approx(everest) and row["tss_logistic"] == pytest.approx(logistic)
    assert row["tss_boosted"] == pytest.approx(everest)
    assert (row["val_tss_boosted"], row["val_tss_logistic"]) == (pytest.approx(0.6), pytest.approx(0.4))
    # ... but the best baseline is the one with the higher validation TSS, and against it EVEREST ties.
    assert row["best_baseline"] == "boosted" and row["best_baseline_val_tss"] == pytest.approx(0.6)
    assert row["delta"] == 0 and row["p_value"] == 1.0 and row["p_holm"] == 1.0 and row["n_pairs"] == 3
    assert row["verdict"] == "ties" and row["note"] == ""
    assert row["sentence"] == ("M-24: EVEREST ties the best baseline (boosted): difference +0.000 TSS "
                               "(95 % CI 0.000 to 0.000, Holm p = 1.000).")
    stats = a.summary_statistics.iloc[0]  # EVEREST's intervals are the per-target section's
    assert (row["everest_tss_t_ci_low"], row["everest_tss_boot_ci_high"]) == (stats["tss_ci_low"],
                                                                              stats["pooled_boot_tss_high"])
    assert row["everest_brier"] == pytest.approx(np.mean([M.evaluate(p["y_true"], p["y_prob"], 0.5)["brier"]
                                                          for p in (preds(s, 0.3) for s in SEEDS)]))
    assert row["best_baseline_brier"] == pytest.approx(row["everest_brier"])
    # The verdict is the report's first section, before the status of the run.
    report = Path(summary.report).read_text()
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings[:3] == ["## Verdict: EVEREST against simple baselines",
                            "## The seed ensemble and calibrated probabilities", "## Status of the run"]
    section = verdict_section(report)
    assert f"* {row['sentence']}" in section and "(#how-to-read-this-report)" in section
    assert "highest mean **validation** TSS" in report.split("## How to read this report\n")[1]  # the method, last
    # The same table, first, for a Prefect artifact: verdict.csv and the summary rows.
    csv = pd.read_csv(summary.verdict_file)
    assert summary.verdict_file == str(tie_root / "analysis" / "verdict.csv")
    assert [c for c in csv.columns if c not in ("tss_boosted", "val_tss_boosted", "tss_logistic",
                                                "val_tss_logistic")] == list(VERDICT_COLUMNS)
    assert csv.loc[0, "verdict"] == "ties" and summary.to_dict()["verdict"][0]["best_baseline"] == "boosted"


def test_validation_not_test_decides_the_best_baseline(tie_root):
    """Same test predictions; logistic now has the higher validation TSS, so it is the best baseline although
    boosted is far better on test, and EVEREST beats it. Equal validation TSS: the model name decides."""
    for s in SEEDS:
        write_experiment(baseline_results(tie_root, "logistic"), "M-24", s, preds(s, 0.0), config_hash="l",
                         val_tss=0.7)
    _, summary = analyse(tie_root, ["M-24"])
    [row] = summary.verdict
    assert row["best_baseline"] == "logistic" and row["verdict"] == "beats"
    assert row["delta"] == pytest.approx(row["everest_tss"] - row["tss_logistic"])
    assert row["ci_low"] > 0 and row["p_holm"] < 0.05
    assert row["sentence"].startswith(f"M-24: EVEREST beats the best baseline (logistic) by {row['delta']:.3f} TSS")
    for s in SEEDS:
        write_experiment(baseline_results(tie_root, "logistic"), "M-24", s, preds(s, 0.0), config_hash="l",
                         val_tss=0.6)
    assert analyse(tie_root, ["M-24"])[1].verdict[0]["best_baseline"] == "boosted"  # tie: name order


def test_clearly_worse_candidate_trails(tmp_path):
    for s in SEEDS:
        weak = preds(s, 0.0)
        write_experiment(tmp_path / "results", "M-24", s, weak)
        write_experiment(baseline_results(tmp_path, "logistic"), "M-24", s, sharp(weak), config_hash="l")
    a, summary = analyse(tmp_path, ["M-24"])
    [row] = summary.verdict
    base = np.mean([tss(sharp(preds(s, 0.0))) for s in SEEDS])
    assert row["best_baseline"] == "logistic" and row["best_baseline_tss"] == pytest.approx(base)
    assert row["delta"] == pytest.approx(row["everest_tss"] - base) and row["delta"] < -0.3
    assert row["ci_high"] < 0 and row["p_holm"] < 0.05 and row["verdict"] == "trails"
    assert row["sentence"] == (f"M-24: EVEREST trails the best baseline (logistic) by {-row['delta']:.3f} TSS "
                               f"(95 % CI {-row['ci_high']:.3f}-{-row['ci_low']:.3f}, "
                               f"Holm p = {_p(row['p_holm'])}).")
    section = verdict_section(Path(summary.report).read_text())
    line, baselines = [x for x in section.splitlines() if x.startswith("| M-24 |")][:2]
    assert f"| {row['everest_tss']:.3f} (3) |" in line and f"| {base:.3f} |" in baselines
    assert f"| logistic ({row['best_baseline_val_tss']:.3f}) | {row['delta']:.3f} |" in line
    assert line.endswith("| **trails** |")
    table = summary.verdict_table()[0]
    assert table["delta"] == round(row["delta"], 3) and table["verdict"] == "trails"


def test_holm_correction_over_targets(tmp_path):
    """Two targets, EVEREST slightly better on each. Holm by hand from the unadjusted p-values written to
    verdict.csv: the smaller p times 2, the larger times 1 but never below the first, capped at 1. On M-24 the
    unadjusted p is below 0.05 and the CI above 0, yet the Holm p is not: the verdict is a tie."""
    for s in SEEDS:
        for target, offset in (("M-24", 0), ("C-24", 50)):
            write_experiment(tmp_path / "results", target, s, preds(offset + s, 0.3))
            write_experiment(baseline_results(tmp_path, "logistic"), target, s, preds(offset + s, 0.28),
                             config_hash="l")
    _, summary = analyse(tmp_path, ["C-24", "M-24"])
    v = pd.read_csv(summary.verdict_file).set_index("target")
    assert list(v.index) == ["C-24", "M-24"] and (v["delta"] > 0).all()
    (small, p1), (large, p2) = sorted(v["p_value"].items(), key=lambda kv: kv[1])
    assert p1 < p2
    assert v.loc[small, "p_holm"] == pytest.approx(min(1.0, 2 * p1))
    assert v.loc[large, "p_holm"] == pytest.approx(min(1.0, max(2 * p1, p2)))
    m = v.loc["M-24"]
    assert small == "M-24" and m["ci_low"] > 0 and m["p_value"] < 0.05 <= m["p_holm"] and m["verdict"] == "ties"
    for t, r in v.iterrows():
        rule = ("beats" if r["ci_low"] > 0 and r["p_holm"] < 0.05 else
                "trails" if r["ci_high"] < 0 and r["p_holm"] < 0.05 else "ties")
        assert r["verdict"] == rule and f"Holm p = {_p(r['p_holm'])}" in r["sentence"], t


def test_without_baselines_the_section_is_one_line(tmp_path):
    for s in SEEDS:
        write_experiment(tmp_path / "results", "M-24", s, preds(s, 0.2))
    a, summary = analyse(tmp_path, ["M-24"])
    assert a.baseline_models == {} and summary.verdict == [] and summary.verdict_file is None
    assert summary.baselines == {} and summary.verdict_table() == []
    assert not (tmp_path / "analysis" / "verdict.csv").exists()
    report = Path(summary.report).read_text()
    assert [x for x in verdict_section(report).splitlines() if x.strip()] == [
        f"No baseline results under `{tmp_path / 'baselines'}`: fit them with `python -m everest baselines "
        f"--array-index K --output-dir {tmp_path}` (K = 1..45) and rerun the analysis."]
    assert report.index("## Verdict") < report.index("## Status of the run")
    assert cli_main(["--results-dir", str(tmp_path / "results"), "--bootstrap", "100", "--no-plots",
                     "--baseline-model", "logistic"]) == 2  # NAME=DIR required


def test_baseline_experiments_are_not_everest_results(tmp_path):
    """Baselines hold seeds and targets EVEREST lacks: EVEREST's statistics cover only its own folder, the
    verdict pairs the seeds both have, a target without EVEREST results gets no verdict, and an explicitly
    given baseline root (outside <out>/baselines) joins the found ones."""
    for s in (0, 1):
        write_experiment(tmp_path / "results", "M-24", s, preds(s, 0.3))
    for s in SEEDS:
        write_experiment(baseline_results(tmp_path, "logistic"), "M-24", s, preds(s, 0.1), config_hash="l")
        write_experiment(baseline_results(tmp_path, "logistic"), "C-24", s, preds(10 + s, 0.1), config_hash="l")
        write_experiment(tmp_path / "elsewhere", "M-24", s, preds(s, 0.0), config_hash="p", val_tss=-1.0)
    a, summary = analyse(tmp_path, ["C-24", "M-24"], baseline_dirs={"persistence": tmp_path / "elsewhere"})
    assert (summary.n_completed, summary.n_missing, summary.unexpected) == (2, 4, [])
    assert [r.path for r in a.results.completed] == [tmp_path / "results" / f"everest_M_24h_seed{s}" for s in (0, 1)]
    raw = pd.read_csv(summary.raw_results)
    assert set(raw.loc[raw["status"] == "completed", "path"]) == {str(r.path) for r in a.results.completed}
    assert list(a.baseline_models) == ["logistic", "persistence"]
    c24, m24 = summary.verdict
    assert c24["verdict"] == "n/a" and c24["sentence"] == "C-24: no verdict (EVEREST has no finished seed)."
    assert c24["best_baseline"] == "logistic" and c24["everest_seeds"] == 0
    assert m24["best_baseline"] == "logistic" and m24["n_pairs"] == 2 and m24["best_baseline_seeds"] == 3
    assert m24["tss_persistence"] == pytest.approx(np.mean([tss(preds(s, 0.0)) for s in SEEDS]))
    assert m24["delta"] == pytest.approx(np.mean([tss(preds(s, 0.3)) - tss(preds(s, 0.1)) for s in (0, 1)]))
    # The command line: --baseline-model NAME=DIR adds a root; with --out elsewhere, none is found.
    assert cli_main(["--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "cli"), "--targets", "M-24",
                     "--seeds", "0", "1", "--bootstrap", "200", "--no-plots",
                     "--baseline-model", f"persistence={tmp_path / 'elsewhere'}"]) == 0
    cli = pd.read_csv(tmp_path / "cli" / "analysis" / "verdict.csv")
    assert list(cli["best_baseline"]) == ["persistence"] and "tss_logistic" not in cli


@pytest.mark.parametrize(("lo", "hi", "p", "words"), [
    (-0.004, -0.001, 0.01, "better than logistic's"),
    (0.001, 0.004, 0.01, "worse than logistic's"),
    (-0.001, 0.005, 0.30, "nominally worse than logistic's, within the noise"),
    (0.001, 0.004, 0.20, "nominally worse than logistic's, within the noise"),  # CI above 0, but Holm p too big
])
def test_ensemble_brier_sentence(lo, hi, p, words):
    from everest.analysis.report import ensemble_sentence

    row = {"target": "M-24", "best_baseline": "logistic", "ensemble_brier": 0.1136, "best_baseline_brier": 0.1132,
           "ensemble_brier_delta": 0.0004 if lo > -0.002 else -0.002, "ensemble_brier_ci_low": lo,
           "ensemble_brier_ci_high": hi, "ensemble_brier_p_holm": p}
    text = ensemble_sentence(row)
    assert text.startswith(f"M-24: the EVEREST ensemble's calibrated probabilities are {words}: Brier 0.1136 vs 0.1132")
    assert "lower is better" in text
    assert "no ensemble" in ensemble_sentence({**row, "ensemble_brier_delta": float("nan")})
