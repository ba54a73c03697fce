"""What the report prints and the plots draw: intervals inside the metric's range with their n, figure details
(colour bars, epoch ticks, seed legends, bin counts, empty bins, where a precision-recall curve starts), no
stale plots beside new ones, and the self-contained report for the Prefect UI.

Results are written in the trainer's layout by the helpers of ``test_analysis``; expected numbers are computed
by hand or by scipy.
"""

from __future__ import annotations

import base64
import re
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats as sps
from test_analysis import fixed, region_data, write_experiment

from everest.analysis import PLOT_FILES, ProductionAnalyzer, embed_figures, load_results
from everest.analysis import plots as P
from everest.analysis import stats as st
from everest.analysis.report import interval_text
from everest.analysis.stats import CLIPPED
from everest.config import Experiment
from everest.scoring import baselines as B
from everest.scoring.calibration import reliability_table
from everest.scoring.metrics import ECE_BINS

PNG = b"\x89PNG\r\n\x1a\n"
N_BOOT = 300
T_975_1 = 12.706204736174707  # Student-t 97.5 % quantile, 1 degree of freedom (tables)
T_975_2 = 4.302652729749464  # 2 degrees of freedom


# ---------------------------------------------------------------------------------------------------------------------
# Intervals as shown


def test_two_seed_t_interval_is_clipped_and_flagged():
    """TSS 0.1 and 0.9: mean 0.5 +/- 12.706 * 0.566 / sqrt 2 = [-4.582, 5.582], shown as [-1, 1], flagged."""
    s = st.seed_summary([0.1, 0.9])
    half = T_975_1 * np.std([0.1, 0.9], ddof=1) / np.sqrt(2)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))  # as computed
    assert s["ci_low"] == pytest.approx(-4.582, abs=1e-3)
    iv = st.seed_interval("tss", s["n"], s["ci_low"], s["ci_high"])
    assert (iv.low, iv.high, iv.kind, iv.n, iv.clipped) == (-1.0, 1.0, "t", 2, True)
    assert interval_text(iv) == f"[-1.000, 1.000] (t, n=2 seeds, {CLIPPED})"
    # a time has no upper bound: only the negative end is cut
    lat = st.seed_summary([0.1, 2.0])
    iv = st.seed_interval("latency_ms", lat["n"], lat["ci_low"], lat["ci_high"])
    assert iv.low == 0.0 and iv.high == pytest.approx(1.05 + T_975_1 * np.std([0.1, 2.0], ddof=1) / np.sqrt(2))
    assert iv.clipped and interval_text(iv).endswith(f"(t, n=2 seeds, {CLIPPED})")


def test_two_seeds_show_the_bootstrap_interval_instead():
    s = st.seed_summary([0.1, 0.9])
    boot = st.Interval(estimate=0.5, low=0.42, high=0.61, se=0.05, n_boot=1000, n_units=30)
    iv = st.seed_interval("tss", s["n"], s["ci_low"], s["ci_high"], boot)
    assert (iv.low, iv.high, iv.kind, iv.n, iv.n_seeds, iv.clipped) == (0.42, 0.61, "bootstrap", 30, 2, False)
    assert interval_text(iv) == "[0.420, 0.610] (bootstrap, n=30 regions, instead of t with n=2 seeds)"
    one = st.seed_summary([0.5])  # one seed, no bootstrap: nothing to show, still no error
    assert interval_text(st.seed_interval("tss", one["n"], one["ci_low"], one["ci_high"])) == "n/a"


def test_five_seeds_are_unclipped_and_equal_scipy():
    v = np.array([0.71, 0.75, 0.80, 0.72, 0.93])
    lo, hi = sps.t.interval(0.95, df=4, loc=v.mean(), scale=sps.sem(v))
    s = st.seed_summary(v)
    boot = st.Interval(estimate=0.78, low=0.7, high=0.86, se=0.04, n_boot=1000, n_units=30)
    iv = st.seed_interval("tss", s["n"], s["ci_low"], s["ci_high"], boot)  # enough seeds: t, not bootstrap
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    assert (iv.kind, iv.n, iv.clipped) == ("t", 5, False)
    assert interval_text(iv) == f"[{lo:.3f}, {hi:.3f}] (t, n=5 seeds)"
    assert st.clip_to_range("no_such_metric", -5.0, 5.0) == (-5.0, 5.0, False)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[ProductionAnalyzer, str]:
    """C-24: 3 seeds, TSS 0.1/0.9/0.5 and latency 0.1/1.1/2.1 (no predictions); M-24: 2 seeds with predictions;
    M5-24: 5 seeds, TSS 0.6-0.8; a `logistic` baseline for M-24. Analysed without plots."""
    out = tmp_path_factory.mktemp("mixed")
    for s, (tss, lat) in enumerate([(0.1, 0.1), (0.9, 1.1), (0.5, 2.1)]):
        write_experiment(out / "results", "C-24", s, metrics=fixed(tss), latency=lat)
    for s in (0, 1):
        write_experiment(out / "results", "M-24", s, region_data(np.random.default_rng(s), skill=0.1 + 0.2 * s))
        write_experiment(B.baseline_root(out, "logistic") / "results", "M-24", s,
                         region_data(np.random.default_rng(s), skill=0.05), config_hash="l")
    for s, tss in enumerate([0.6, 0.7, 0.8, 0.75, 0.65]):
        write_experiment(out / "results", "M5-24", s, metrics=fixed(tss))
    a = ProductionAnalyzer(out / "results", targets=["C-24", "M-24", "M5-24"], n_bootstrap=N_BOOT,
                           make_plots=False)
    return a, Path(a.run_complete_analysis().report).read_text()


def _row(text: str, section: str, target: str) -> str:
    part = text.split(section)[1]
    return next(line for line in part.splitlines() if line.startswith(f"| {target} |"))


def _interval(text: str, section: str, target: str, quantity: str) -> str:
    """The cell of an interval table row ``| target | quantity | interval |`` in ``section``."""
    part = (text.split(section)[1] if section else text).split("\n## ")[0]
    return next(line for line in part.splitlines() if line.startswith(f"| {target} | {quantity} |")
                ).split(" | ")[2].removesuffix(" |")


def test_report_intervals_are_clipped_replaced_and_carry_n(mixed):
    a, text = mixed
    detailed = "## Per-target results with confidence intervals"
    half = T_975_2 * 0.4 / np.sqrt(3)  # C-24 TSS: mean 0.5, sd 0.4
    assert _interval(text, detailed, "C-24", "TSS (t)") == f"[{0.5 - half:.3f}, 1.000] (t, n=3 seeds, {CLIPPED})"
    m = a.bootstrap["M-24"].pooled["tss"]
    assert _interval(text, detailed, "M-24", "TSS (t)") == (f"[{m.low:.3f}, {m.high:.3f}] (bootstrap, n=30 regions, "
                                                            "instead of t with n=2 seeds)")
    boot = _interval(text, detailed, "M-24", "TSS (bootstrap)")
    assert boot == f"[{m.low:.3f}, {m.high:.3f}] (bootstrap, n=30 regions)"
    v = [0.6, 0.7, 0.8, 0.75, 0.65]
    lo, hi = sps.t.interval(0.95, df=4, loc=np.mean(v), scale=sps.sem(v))
    assert _interval(text, detailed, "M5-24", "TSS (t)") == f"[{lo:.3f}, {hi:.3f}] (t, n=5 seeds)"
    lat_half = T_975_2 * 1.0 / np.sqrt(3)  # latency: mean 1.1, sd 1.0
    assert f"| [0.000, {1.1 + lat_half:.3f}] (t, n=3 seeds, {CLIPPED}) |" in _row(text, "## Latency", "C-24")
    # The summary table keeps the t-interval as computed.
    c24 = a.summary_statistics.set_index("target").loc["C-24"]
    assert c24["tss_ci_high"] == pytest.approx(0.5 + half)


def test_every_printed_interval_states_its_n_and_stays_in_range(mixed):
    _, text = mixed
    bounds = re.compile(r"\[(-?\d+\.\d+), (-?\d+\.\d+)\]( \([^)]*\))?")
    found = list(bounds.finditer(text))
    latency = text.index("## Latency")  # the last section with intervals: times, >= 0 without upper bound
    assert len(found) > 10
    for m in found:
        assert m[3] and re.match(r" \((t|bootstrap), n=\d+ (seed|region)s?", m[3]), m[0]
        if not re.search(r"seed pairs?|\d+/\d+ seeds", m[3]):  # a difference (comparison) spans [-2, 2]
            low, high = float(m[1]), float(m[2])
            assert (-1 <= low <= high <= 1) if m.start() < latency else 0 <= low <= high, m[0]


def test_verdict_intervals_carry_n(mixed):
    a, text = mixed
    [row] = [r for r in a.verdict.to_dict("records") if r["target"] == "M-24"]
    assert (row["n_pairs"], row["n_units"]) == (2, 30)
    verdict = text.split("## Verdict: EVEREST against simple baselines\n")[1].split("\n## ")[0]
    assert _interval(verdict, "", "M-24", "ΔTSS") == (f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (bootstrap, "
                                                     "n=30 regions, 2 seed pairs)")
    assert "(bootstrap, n=30 regions, instead of t with n=2 seeds)" in _interval(verdict, "", "M-24", "EVEREST TSS (t)")
    assert f"* {row['sentence']} (CI: paired region bootstrap, n=30 regions, 2 seed pairs.)" in verdict


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def test_heatmaps_have_colour_bars_and_the_horizon_panel_clips(mixed):
    a, _ = mixed
    fig = a.figures()["performance"]
    assert len(fig.axes) == 4  # colour bars are children of their heatmap, not panels
    for ax in fig.axes[:3]:
        bar = ax.images[0].colorbar
        assert bar is not None and bar.ax in ax.child_axes
    ax = fig.axes[3]
    for container in ax.containers:  # every error bar inside TSS's range
        for seg in container.lines[2][0].get_segments():
            assert -1.0 <= seg[:, 1].min() and seg[:, 1].max() <= 1.0
    notes = " ".join(t.get_text() for t in ax.texts)
    assert CLIPPED in notes and "hollow: region-bootstrap interval" in notes  # C-24 clipped, M-24 two seeds


def test_training_panels_have_integer_epochs_and_a_seed_legend_on_loss(tmp_path):
    for s in (0, 1):
        write_experiment(tmp_path, "M-24", s, metrics=fixed(0.5))
    fig = P.training_figure(load_results(tmp_path, ["M-24"], [0, 1]).analysed)
    fig.canvas.draw()
    tss_ax, loss_ax = fig.axes
    for ax in (tss_ax, loss_ax):
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"\d+", x) for x in labels), labels
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["seed 0", "seed 1"]


def test_reliability_leaves_empty_bins_empty_and_shows_counts(tmp_path):
    """Probabilities only in bins 0, 7 and 14: the seed-mean line is NaN at the other 12 bins, and the count
    histogram under the diagram has the bins' sample counts."""
    rng = np.random.default_rng(0)
    prob = np.repeat([0.02, 0.5, 0.99], [60, 30, 10])
    y = (rng.random(prob.size) < prob).astype(int)
    write_experiment(tmp_path, "M-24", 0, pd.DataFrame({"y_true": y, "y_prob": prob, "noaa_ar": np.arange(100)}))
    fig = P.reliability_figure(load_results(tmp_path, ["M-24"], [0]).analysed)
    [ax] = fig.axes
    line = next(x for x in ax.lines if x.get_label() == "1 seeds")
    freq = np.asarray(line.get_ydata(), float)
    filled = [0, 7, 14]
    assert np.isnan(np.delete(freq, filled)).all() and np.isfinite(freq[filled]).all()
    assert freq[filled] == pytest.approx([y[:60].mean(), y[60:90].mean(), y[90:].mean()])
    [hist] = ax.child_axes
    heights = [p.get_height() for p in hist.patches]
    assert heights == pytest.approx(np.bincount([0] * 60 + [7] * 30 + [14] * 10, minlength=ECE_BINS))


def test_reliability_curves_break_at_empty_bins_over_their_counts():
    prob = np.repeat([0.02, 0.5, 0.99], [60, 30, 10])
    table = reliability_table((prob > 0.4).astype(int), prob)
    fig = P.reliability_curves_figure({"model": table}, "test")
    [ax] = fig.axes
    line = next(x for x in ax.lines if x.get_label() == "model")
    freq = np.asarray(line.get_ydata(), float)
    assert np.isnan(np.delete(freq, [0, 7, 14])).all() and freq[[0, 7, 14]].tolist() == [0.0, 1.0, 1.0]
    [hist] = ax.child_axes
    [stairs] = hist.patches
    counts = stairs.get_data().values
    assert np.isnan(np.delete(counts, [0, 7, 14])).all() and counts[[0, 7, 14]].tolist() == [60, 30, 10]


def test_precision_recall_starts_at_the_highest_threshold(tmp_path):
    """Scores 0.9, 0.9 (one flare, one not), 0.8 (flare), 0.3, 0.2: the highest threshold, 0.9, flags two
    samples, one a flare: precision 1/2, recall 1/2. scikit-learn's (recall 0, precision 1) is not drawn."""
    pred = pd.DataFrame({"y_true": [1, 0, 1, 0, 0], "y_prob": [0.9, 0.9, 0.8, 0.3, 0.2], "noaa_ar": range(5)})
    write_experiment(tmp_path, "M-24", 0, pred)
    fig = P.roc_pr_figure(load_results(tmp_path, ["M-24"], [0]).analysed)
    pr_ax = fig.axes[1]
    line = pr_ax.lines[0]
    recall, precision = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert (recall[0], precision[0]) == (0.5, 0.5)
    assert (recall[-1], precision[-1]) == (1.0, pytest.approx(0.4))  # lowest threshold: everything flagged
    assert line.get_label() == "1 seeds, one line each"


# ---------------------------------------------------------------------------------------------------------------------
# No stale plots


def test_plots_of_an_earlier_larger_analysis_are_removed(tmp_path):
    plots = tmp_path / "plots"
    plots.mkdir()
    stale = ["reliability_M5-72.png", "reliability_C-24.png", PLOT_FILES["training"]]
    unrelated = ["reliability_notes.png", "reliability_X-1.png", "my_figure.png", "notes.txt"]
    for name in stale + unrelated:
        (plots / name).write_bytes(b"old")
    for s in (0, 1):  # no validation predictions: no ensemble, so no reliability_<target>.png this time
        write_experiment(tmp_path / "results", "M-24", s, region_data(np.random.default_rng(s)))
    summary = ProductionAnalyzer(tmp_path / "results", targets=["M-24"], seeds=[0, 1],
                                 n_bootstrap=100).run_complete_analysis()
    figures = [name for key, name in PLOT_FILES.items() if key != "verdict"]  # no baselines: no verdict figure
    assert sorted(p.name for p in plots.iterdir()) == sorted([*figures, *unrelated])
    assert all(Path(p).read_bytes()[:8] == PNG for p in summary.plots.values())  # rewritten, not the old bytes
    assert all((plots / name).read_bytes() == b"old" for name in unrelated)


# ---------------------------------------------------------------------------------------------------------------------
# The self-contained report


def _png(path: Path, width_in: float = 3.0) -> Path:
    fig = Figure(figsize=(width_in, 2.0))
    fig.subplots().plot([0, 1], [1, 0])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


DATA_IMAGE = re.compile(r"!\[([^\]]*(?:\[[^\]]*\][^\]]*)*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def test_embed_figures_inlines_pngs_and_keeps_the_text(tmp_path):
    report_dir = tmp_path / "analysis"
    report_dir.mkdir()
    _png(tmp_path / "plots" / "a.png")
    before = "# Report\n\n| a | [0.1, 0.2] (t, n=5 seeds) |\n\n### A figure\n\n"
    middle = "\n\nSome text with [a link](https://example.org) and `code`.\n\n"
    after = "\n\n![remote](https://example.org/x.png)\n"
    md = (f"{before}![TSS with [-1, 1] bounds](../plots/a.png){middle}![gone](../plots/missing.png) "
          f"and ![again](../plots/a.png){after}")
    out = embed_figures(md, report_dir)
    images = DATA_IMAGE.findall(out)
    assert [alt for alt, _ in images] == ["TSS with [-1, 1] bounds", "again"]
    for _, data in images:
        assert base64.b64decode(data, validate=True)[:8] == PNG
    rebuilt = DATA_IMAGE.sub(lambda m: f"![{m[1]}](../plots/a.png)", out)
    assert rebuilt == md.replace("![gone](../plots/missing.png)", "(figure missing.png not found)")
    assert out.startswith(before) and out.endswith(after)  # URLs and all other text untouched


def test_embed_figures_downsamples_only_the_embedded_copy(tmp_path):
    wide = _png(tmp_path / "wide.png", width_in=30.0)  # 3000 px
    original = wide.read_bytes()
    md = "![w](wide.png)"
    exact = DATA_IMAGE.findall(embed_figures(md, tmp_path, max_width_px=None))[0][1]
    assert base64.b64decode(exact) == original
    small = base64.b64decode(DATA_IMAGE.findall(embed_figures(md, tmp_path, max_width_px=800))[0][1])
    with Image.open(BytesIO(small)) as im:
        assert im.size == (800, 53)  # 3000 x 200 scaled to 800 wide
    assert small[:8] == PNG and wide.read_bytes() == original
    with pytest.raises(ValueError, match="max_width_px must be a positive integer or None, got 0"):
        embed_figures(md, tmp_path, max_width_px=0)


def test_embedded_nine_target_report_is_under_two_megabytes(tmp_path):
    """Every figure of a 9-target run (2 seeds each) inlined: all images become PNG data URIs, size < 2 MB."""
    for k in range(1, 46):
        e = Experiment.from_array_index(k)
        if e.seed < 2:
            write_experiment(tmp_path / "results", str(e.target), e.seed,
                             region_data(np.random.default_rng(k), n_regions=20, rows=30))
    summary = ProductionAnalyzer(tmp_path / "results", seeds=[0, 1], n_bootstrap=100).run_complete_analysis()
    report = Path(summary.report)
    out = embed_figures(report.read_text(), report.parent)
    images = DATA_IMAGE.findall(out)
    assert len(images) == len(summary.plots) == 7 and "](../plots/" not in out
    assert all(base64.b64decode(data)[:8] == PNG for _, data in images)
    assert len(out.encode()) < 2_000_000
