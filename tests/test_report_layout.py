"""The report read as a user reads it: the first screen answers (what was run, every target with its verdict
word, the verdict figure before any table), no table is too wide, the method text comes last."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis import region_data, write_experiment

from everest.analysis import PLOT_FILES, ProductionAnalyzer
from everest.analysis import plots as P
from everest.analysis.report import MAX_COLUMNS, MAX_WIDTH, rendered_width
from everest.scoring import baselines as B

TARGETS = ("C-24", "M-24", "M5-24")
VERDICT_WORD = re.compile(r"\*\*(beats|ties|trails)\*\*")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[ProductionAnalyzer, str]:
    """Three targets, two seeds each: EVEREST clearly better than its `logistic` baseline on C-24, equal on M-24,
    clearly worse on M5-24; analysed with plots."""
    out = tmp_path_factory.mktemp("layout")
    for t, (mine, theirs) in zip(TARGETS, [(0.9, 0.1), (0.4, 0.4), (0.1, 0.9)], strict=True):
        for s in (0, 1):
            write_experiment(out / "results", t, s, region_data(np.random.default_rng(s), skill=mine))
            write_experiment(B.baseline_root(out, "logistic") / "results", t, s,
                             region_data(np.random.default_rng(s), skill=theirs), config_hash="l")
    a = ProductionAnalyzer(out / "results", targets=list(TARGETS), seeds=[0, 1], n_bootstrap=200)
    return a, Path(a.run_complete_analysis().report).read_text()


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of ``text`` as rows of cells (the separator line left out)."""
    found, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def test_the_first_screen_names_every_target_with_its_verdict_and_shows_the_figure(study):
    a, text = study
    lines = text.splitlines()
    head = lines[:25]
    verdicts = a.verdict.set_index("target")["verdict"]
    assert verdicts.to_dict() == {"C-24": "beats", "M-24": "ties", "M5-24": "trails"}
    for t in TARGETS:
        (line,) = [x for x in head if x.startswith(f"* **{t}**:")]
        assert VERDICT_WORD.search(line)[1] == verdicts[t], line
        assert "(bootstrap, n=" in line and "seed pair" in line  # ΔTSS's interval says what it is
    assert head[2].startswith("**Run:** 3 target(s) × seeds 0, 1 = 6 experiments, 6 finished;")
    assert "(#how-to-read-this-report)" in head[2]
    first_table = next(i for i, x in enumerate(lines) if x.startswith("|"))
    (figure,) = [i for i, x in enumerate(lines[:first_table]) if x.startswith("![")]
    assert figure < 25 and f"(../plots/{PLOT_FILES['verdict']})" in lines[figure]
    assert (a.plots_dir / PLOT_FILES["verdict"]).read_bytes()[:4] == b"\x89PNG"


def test_no_table_is_wider_than_the_limits_and_every_number_stays(study):
    a, text = study
    found = tables(text)
    assert len(found) > 15
    for rows in found:
        header, body = rows[0], rows[1:]
        assert len(header) <= MAX_COLUMNS, header
        assert rendered_width(header, body) <= MAX_WIDTH, (rendered_width(header, body), header)
    # What was one wide verdict table is still there, split: every verdict number of every target.
    verdict = text.split("## Verdict: EVEREST against simple baselines")[1].split("\n## ")[0]
    for r in a.verdict.to_dict("records"):
        for value in (r["everest_tss"], r["delta"], r["everest_brier"], r["best_baseline_brier"], r["tss_logistic"],
                      r["ci_low"], r["ci_high"], r["everest_tss_boot_ci_low"]):
            assert f"{value:.3f}" in verdict, (r["target"], value)


def test_the_method_text_comes_last_and_the_sections_link_to_it(study):
    _, text = study
    headings = [x for x in text.splitlines() if x.startswith("## ")]
    assert headings[0] == "## Verdict: EVEREST against simple baselines"
    assert headings[-1] == "## How to read this report"
    guide = text.split("## How to read this report\n")[1]
    for words in ("highest mean **validation** TSS", "Every interval is a 95 % interval", "region-block bootstrap",
                  "Hedges' g", "the *oracle*", "**calibrated** on the validation split"):
        assert words in guide and words not in text.split("## How to read this report\n")[0], words
    assert text.count("(#how-to-read-this-report)") >= 5


def test_the_verdict_figure_draws_each_targets_difference_and_interval(study):
    a, _ = study
    rows = a.verdict.set_index("target")
    (ax,) = P.verdict_figure(a.verdict, 0.05, 0.95).axes
    assert [t.get_text() for t in ax.get_yticklabels()] == list(TARGETS)  # top to bottom: the report's order
    points = [ln for ln in ax.lines if ln.get_marker() == "o" and len(ln.get_xdata())]
    assert [float(ln.get_xdata()[0]) for ln in points] == pytest.approx([rows.loc[t, "delta"] for t in TARGETS])
    assert [ln.get_markerfacecolor() != "white" for ln in points] == [rows.loc[t, "p_holm"] < 0.05 for t in TARGETS]
    bars = [c for c in ax.collections if c.get_segments()]  # each interval: one horizontal segment
    assert [tuple(np.round(c.get_segments()[0][:, 0], 9)) for c in bars] == [
        tuple(np.round((rows.loc[t, "ci_low"], rows.loc[t, "ci_high"]), 9)) for t in TARGETS]
    assert not [ln for ln in ax.lines if ln.get_marker() == "D" and len(ln.get_xdata())]  # no ensemble here
    assert any(list(ln.get_xdata()) == [0, 0] for ln in ax.lines if ln.get_linestyle() == "--")  # the zero line


def test_the_verdict_figure_puts_the_ensemble_beside_the_seed_mean_and_skips_targets_without_a_difference():
    verdict = pd.DataFrame([
        {"target": "M-24", "delta": 0.1, "ci_low": -0.05, "ci_high": 0.25, "p_holm": 0.2, "ensemble_tss": 0.55,
         "best_baseline_tss": 0.4, "verdict": "ties"},
        {"target": "C-48", "delta": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
         "p_holm": float("nan"), "ensemble_tss": float("nan"), "best_baseline_tss": 0.3, "verdict": "n/a"}])
    (ax,) = P.verdict_figure(verdict, 0.05, 0.95).axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["M-24"]
    (ensemble,) = [ln for ln in ax.lines if ln.get_marker() == "D" and len(ln.get_xdata())]
    assert float(ensemble.get_xdata()[0]) == pytest.approx(0.15)
    assert P.verdict_figure(verdict.iloc[1:], 0.05, 0.95) is None  # no difference at all: no figure
