"""Seeded synthetic SHARP flare tables in the real 18-file layout.

Why: no real training table can be downloaded here, so the project trains and tests on data that has the
real format and the real statistics, read through the same loader as real files, and that knows its own
answer: every CSV gets a sidecar ``truth/<same name>`` with the generator's true probability that each row
is ``P`` (the Bayes ceiling against which trained models are judged).

Model (per active region, 12-minute steps, rates per day; constants in :class:`Physics`):

* latent size ``s ~ N(0, 1)``; lifetime 6-10 days; log-trend ``N(-0.04, 0.12)`` dex/day plus an
  Ornstein-Uhlenbeck growth term ``g(t)`` (emergence episodes); ``z(t) = s + drift(t) / 0.6``.
* extensive features ``log10 x_f = mu_f + sd_f (r_f z + sqrt(1 - r_f^2) e_f) + AR(1) noise``;
  R_VALUE ``N(2.4 + 1.2 z, 0.6)`` clipped to [0, 5.6] and exactly 0 with a probability falling with z;
  MEANALP symmetric around 0 with a spread growing with z.
* flares >= C1.0: Poisson rate ``lambda_C = exp(a + b z + c (R* - 2.4) + d growth + h)`` with a hidden
  per-region productivity ``h`` (seen by ``p_true``, not by the features). Peak fluxes follow a power
  law of index 2 above C1.0 with an exponential taper at a size-dependent maximum flux ``F_max(z)``
  (a free-energy cap). The taper is required: with one shared index-2 law the >=M rate is 10 % of the
  >=C rate everywhere and, by Jensen's inequality, a 55 % C-24 positive rate forces M-24 >= 7.7 %;
  the real tables have 3 %. Big flares therefore come from big regions, as on the Sun.
* a record is ``P`` for a target when a flare of at least the class starts in the horizon after it
  (flares of a region stop when it leaves the disk); ``p_true = 1 - exp(-integral of the class rate``
  over the horizon along the generator's own latent rate path).

Sizes (:data:`SIZES`): ``full`` and ``calibrated`` observe whole region lives and are calibrated to the
real tables (``full`` has their row counts; ``calibrated`` is a smaller in-memory size for tests).
``demo`` and ``tiny`` observe each region for a 4-8 hour segment only (many short looks at many regions,
so a region-disjoint validation split and the rare targets have enough independent episodes) and ENRICH
flaring regions: regions are drawn with a weight favouring >=M5 producers, segments sit at the region's
peak latent M5 rate, and the rest of the weight partly favours quiet regions so the C files keep
negatives. Their base rates are enriched and NOT calibrated, while per-row ``p_true`` stays exact
(selection uses latent rates only, never realised flares).
The five flare-history columns (Cdec, Chis1d, Chis, Edec, Xmax1d) are filler
computed from the region's past flares only.

All 9 files of one split hold the same rows (the C files too; the reference loader's C zero-filter
drops rows at read time); only the ``Flare`` column differs. Test files hold later, distinct regions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import maximum_filter1d
from scipy.signal import lfilter

from everest import io
from everest.config import FLARE_CLASSES, HORIZONS, Target, all_targets

# Column order of the real tables (the layout of Abduallah et al. 2023).
META_COLUMNS: tuple[str, ...] = ("Flare", "DATE__OBS", "NOAA_AR", "HARPNUM")
FEATURE_COLUMNS: tuple[str, ...] = (
    "TOTUSJH", "Cdec", "TOTUSJZ", "Chis1d", "USFLUX", "MEANALP", "R_VALUE", "TOTPOT", "Chis", "SAVNCPP",
    "AREA_ACR", "Edec", "Xmax1d", "ABSNJZH",
)
COLUMNS: tuple[str, ...] = META_COLUMNS + FEATURE_COLUMNS
SPLITS: tuple[str, ...] = ("training", "testing")

STEPS_PER_DAY = 120  # 12-minute cadence (hmi.sharp_cea_720s)
STEPS_PER_HOUR = 5
DT = 1.0 / STEPS_PER_DAY  # days per step
C1 = 1e-6  # GOES peak flux of a C1.0 flare, W/m^2
# Flare-class thresholds in units of C1.0.
CLASS_FLUX: dict[str, float] = {"C": 1.0, "M": 10.0, "M5": 50.0}
START_TIME = np.datetime64("2010-05-01T00:00:00", "s")  # start of the SDO/HMI SHARP era
FIRST_NOAA = 11064
_FLOAT_FORMAT = "%.7g"


@dataclass(frozen=True)
class SizeSpec:
    """How many regions each split holds and how they are observed (see module docstring)."""

    train_regions: int
    test_regions: int
    segment_days: tuple[float, float] | None = None  # None: whole life observed; else a segment of U(lo, hi) days
    enrich: float = 0.0  # share of selection weight given to the expected >=M5 count (0 = natural sample)
    pool_factor: int = 1  # candidate regions drawn per selected region when enriching
    gaps_per_day: float = 0.12  # observation gaps (padding runs) per region-day: ~1.3 % padding rows


SIZES: dict[str, SizeSpec] = {
    # ~2,400 train / ~900 test rows per file: 80 / 30 regions seen for 4-8 h each; enriched (not calibrated).
    "tiny": SizeSpec(train_regions=80, test_regions=30, segment_days=(0.15, 0.35), enrich=0.5, pool_factor=20,
                     gaps_per_day=0.3),
    # ~7,000 train / ~2,600 test rows per file: 240 / 90 regions seen for 4-8 h each; enriched (not calibrated).
    "demo": SizeSpec(train_regions=240, test_regions=90, segment_days=(0.15, 0.35), enrich=0.5, pool_factor=20,
                     gaps_per_day=0.3),
    # ~28,000 train / ~10,500 test rows per file: `demo` with four times the regions, so that the seed-to-seed
    # spread of test TSS reflects the model, not a handful of flaring regions in validation and test.
    "study": SizeSpec(train_regions=960, test_regions=360, segment_days=(0.15, 0.35), enrich=0.5, pool_factor=20,
                      gaps_per_day=0.3),
    # whole lives, natural sample: calibrated rates, for in-memory calibration tests (more test regions than full).
    "calibrated": SizeSpec(train_regions=400, test_regions=200),
    # whole lives, natural sample: ~560k train / ~58k test rows per file, the real tables' sizes.
    "full": SizeSpec(train_regions=585, test_regions=61),
}


@dataclass(frozen=True)
class FeatureLaw:
    """Log10 law of one extensive feature: population mean/sd, loading on size, AR step (dex)."""

    mu: float
    sd: float
    r: float
    step: float
    twist: float = 0.0  # share of the non-size part carried by the common twist factor


@dataclass(frozen=True)
class Physics:
    """Generator constants, calibrated to measured real SHARP statistics (log10 mean and sd of region-days without a
    >=M flare the next day, feature correlations, 12-minute step sizes)."""

    features: dict[str, FeatureLaw] = field(default_factory=lambda: {
        "TOTUSJH": FeatureLaw(2.48, 0.58, 0.96, 0.012),
        "TOTUSJZ": FeatureLaw(12.80, 0.57, 0.95, 0.012),
        "USFLUX": FeatureLaw(21.69, 0.57, 0.90, 0.010),
        "TOTPOT": FeatureLaw(22.54, 0.80, 0.93, 0.016),
        "AREA_ACR": FeatureLaw(2.34, 0.56, 0.90, 0.012),
        "SAVNCPP": FeatureLaw(12.13, 0.53, 0.85, 0.040, twist=0.8),
        "ABSNJZH": FeatureLaw(1.31, 0.64, 0.85, 0.050, twist=0.8),
    })
    noise_phi: float = 0.99  # per-step AR(1) coefficient of measurement noise
    flux_sd: float = 0.6  # dex of USFLUX per unit of latent size: converts drift (dex) to z units
    trend_mean: float = -0.04  # dex/day (average region decays)
    trend_sd: float = 0.12
    growth_sd: float = 0.15  # dex/day, OU emergence term
    growth_days: float = 1.0  # its correlation time
    r_mean: float = 2.4
    r_slope: float = 1.2
    r_region_sd: float = 0.6
    r_step: float = 0.12  # a 12-minute step moves R_VALUE by ~17 % of its within-region spread
    r_zero_base: float = -0.7  # probit of P(R_VALUE = 0) at z = 0 (30 % of negatives)
    r_zero_slope: float = 0.8
    alpha_sd: float = 0.017  # MEANALP spread at z = 0, 1/Mm
    alpha_growth: float = 0.37  # log-spread per unit z
    rate_a: float = -0.1  # log >=C rate per day at z = 0
    rate_b: float = 0.25
    rate_c: float = 0.3
    rate_d: float = 2.0  # per dex/day of growth
    productivity_sd: float = 0.6  # hidden per-region log-rate offset
    fmax_a: float = -1.4  # log10 F_max (units of C1.0) at z = 0: >=M needs z >~ 1.3 (~10 % of regions)
    fmax_b: float = 1.8
    fmax_r: float = 0.5  # per unit of the region's R offset (R* above its size expectation)


def _ar1(rng: np.random.Generator, shape: tuple[int, int], phi: float, sd: float) -> np.ndarray:
    """Stationary AR(1) paths along axis 1 with marginal sd ``sd`` (one independent path per row)."""
    innov = rng.standard_normal(shape) * (sd * np.sqrt(1.0 - phi * phi))
    zi = (phi * sd * rng.standard_normal(shape[0]))[:, None]
    return lfilter([1.0], [1.0, -phi], innov, axis=1, zi=zi)[0]


def _window_sum(x: np.ndarray, width: int) -> np.ndarray:
    """Forward window sums along axis 1: out[:, k] = x[:, k:k+width].sum (zeros beyond the end)."""
    cs = np.zeros((x.shape[0], x.shape[1] + width + 1))
    np.cumsum(x, axis=1, out=cs[:, 1:x.shape[1] + 1])
    cs[:, x.shape[1] + 1:] = cs[:, [x.shape[1]]]
    return cs[:, width:width + x.shape[1]] - cs[:, :x.shape[1]]


def _past_sum(x: np.ndarray, width: int) -> np.ndarray:
    """Backward window sums along axis 1 excluding the current step: out[:, k] = x[:, k-width:k].sum."""
    cs = np.zeros((x.shape[0], x.shape[1] + 1))
    np.cumsum(x, axis=1, out=cs[:, 1:])
    lo = np.maximum(np.arange(x.shape[1]) - width, 0)
    return cs[:, :-1] - cs[:, lo]


@dataclass
class SplitData:
    """One split in memory: the shared table, and labels and true probabilities per target."""

    table: pd.DataFrame  # DATE__OBS, NOAA_AR, HARPNUM and the 14 features (physical units)
    padding: np.ndarray  # (N,) bool: gap-filler rows
    labels: dict[Target, np.ndarray]  # (N,) bool per target; False on padding rows
    p_true: dict[Target, np.ndarray]  # (N,) float per target; NaN on padding rows
    z: np.ndarray  # (N,) latent size of the row (diagnostics)
    region_index: np.ndarray  # (N,) 0-based region number within the split

    def flare_column(self, target: Target | str) -> np.ndarray:
        """The ``Flare`` column for ``target``: ``P``/``N``/``padding``."""
        t = Target.parse(target)
        out = np.where(self.labels[t], "P", "N").astype(object)
        out[self.padding] = "padding"
        return out

    def frame(self, target: Target | str) -> pd.DataFrame:
        """The table of ``target`` in the real column order."""
        df = self.table.copy()
        df.insert(0, "Flare", self.flare_column(target))
        return df[list(COLUMNS)]


def _simulate_split(
    rng: np.random.Generator, spec: SizeSpec, n_regions: int, first_step: int, first_noaa: int, first_harp: int,
    phys: Physics,
) -> tuple[SplitData, int, int, int]:
    """Simulate ``n_regions`` regions born from ``first_step`` on; returns data and the next step/NOAA/HARP."""
    pool = n_regions * (spec.pool_factor if spec.enrich > 0 else 1)
    # --- region-level latent draws for the candidate pool
    s = rng.standard_normal(pool)
    life = rng.integers(6 * STEPS_PER_DAY, 10 * STEPS_PER_DAY + 1, size=pool)
    tau = rng.normal(phys.trend_mean, phys.trend_sd, size=pool)
    # Flare productivity beyond size rides on the region's non-potential "twist" factor, which SAVNCPP and
    # ABSNJZH observe (with noise): p_true then depends on what a forecaster can see, so it is a Bayes ceiling.
    twist = rng.standard_normal(pool)
    prod = phys.productivity_sd * twist
    e_r = rng.standard_normal(pool)
    width = int(life.max())
    steps = np.arange(width)
    valid = steps[None, :] < life[:, None]  # (P, T)
    phi_g = np.exp(-DT / phys.growth_days)
    g = _ar1(rng, (pool, width), phi_g, phys.growth_sd)  # dex/day
    big_g = np.cumsum(g, axis=1) * DT
    big_g -= ((big_g * valid).sum(axis=1) / life)[:, None]
    drift = tau[:, None] * (steps[None, :] - life[:, None] / 2) * DT + big_g  # dex
    z = s[:, None] + drift / phys.flux_sd
    r_offset = phys.r_region_sd * e_r
    r_star = phys.r_mean + phys.r_slope * z + r_offset[:, None]
    log_rate = (phys.rate_a + phys.rate_b * z + phys.rate_c * (r_star - phys.r_mean)
                + phys.rate_d * (tau[:, None] + g) + prod[:, None])
    lam_c = np.exp(log_rate) * valid  # >=C flares per day; zero once the region has left the disk
    fmax = 10.0 ** (phys.fmax_a + phys.fmax_b * z + phys.fmax_r * e_r[:, None])
    lam = {cls: lam_c * (1.0 / f) * np.exp(-(f - 1.0) / fmax) for cls, f in CLASS_FLUX.items()}

    # --- observed window of each region; enrichment picks regions by their latent expected >=M5 count in
    # the best-placed window (segment + 24 h), never by realised flares, so p_true stays exact
    if spec.segment_days is None:
        o_start = np.zeros(pool, dtype=np.int64)
        o_len = life.copy()
    else:
        lo, hi = (int(round(d * STEPS_PER_DAY)) for d in spec.segment_days)
        o_len = np.minimum(rng.integers(lo, hi + 1, size=pool), life)
        cs = np.concatenate([np.zeros((pool, 1)), np.cumsum(lam["M5"], axis=1)], axis=1)
        ends = np.minimum(steps[None, :] + o_len[:, None] + 24 * STEPS_PER_HOUR, width)
        score = np.take_along_axis(cs, ends, axis=1) - cs[:, :-1]
        score[steps[None, :] > (life - o_len)[:, None]] = -1.0
        peak = np.argmax(score, axis=1)
        expect = score[np.arange(pool), peak] * DT
        uniform = (rng.random(pool) * (life - o_len + 1)).astype(np.int64)
        # quiet regions too, or the enriched C files would hold almost no negatives: chance of no >=C flare
        # over the uniformly placed segment + 72 h
        cs_c = np.concatenate([np.zeros((pool, 1)), np.cumsum(lam["C"], axis=1)], axis=1)
        c_end = np.minimum(uniform + o_len + 72 * STEPS_PER_HOUR, width)
        rows = np.arange(pool)
        quiet = np.exp(-(cs_c[rows, c_end] - cs_c[rows, uniform]) * DT)
        o_start = np.where(rng.random(pool) < spec.enrich, peak, uniform)
    if spec.enrich > 0:
        rest = 0.5 / pool + 0.5 * quiet / quiet.sum()
        w = (1 - spec.enrich) * rest + spec.enrich * expect / expect.sum()
        keep = np.sort(rng.choice(pool, size=n_regions, replace=False, p=w / w.sum()))
        s, life, tau, twist, e_r, valid, g, z, r_star, o_start, o_len = (
            a[keep] for a in (s, life, tau, twist, e_r, valid, g, z, r_star, o_start, o_len))
        lam = {k: v[keep] for k, v in lam.items()}
    n = n_regions

    # --- flares: counts per step in the bins [C1, M1), [M1, M5), [M5, inf)
    n_m5 = rng.poisson(lam["M5"] * DT)
    n_m = n_m5 + rng.poisson(np.maximum(lam["M"] - lam["M5"], 0) * DT)
    n_c = n_m + rng.poisson(np.maximum(lam["C"] - lam["M"], 0) * DT)
    counts = {"C": n_c, "M": n_m, "M5": n_m5}

    # --- flatten the observed cells (rows of one region contiguous, time-ordered)
    total = int(o_len.sum())
    reg = np.repeat(np.arange(n), o_len)
    offsets = np.concatenate([[0], np.cumsum(o_len)[:-1]])
    k = o_start[reg] + (np.arange(total) - offsets[reg])
    cell = (reg, k)

    labels: dict[Target, np.ndarray] = {}
    p_true: dict[Target, np.ndarray] = {}
    for cls in FLARE_CLASSES:
        for h in HORIZONS:
            hs = h * STEPS_PER_HOUR
            t = Target(flare_class=cls, horizon=h)
            labels[t] = _window_sum(counts[cls].astype(np.float64), hs)[cell] > 0
            p_true[t] = -np.expm1(-_window_sum(lam[cls], hs)[cell] * DT)

    # --- padding runs at observation gaps
    n_gaps = rng.poisson(spec.gaps_per_day * o_len / STEPS_PER_DAY)
    g_reg = np.repeat(np.arange(n), n_gaps)
    g_len = rng.integers(1, 25, size=g_reg.size)
    g_start = (rng.random(g_reg.size) * o_len[g_reg]).astype(np.int64)
    g_len = np.minimum(g_len, o_len[g_reg] - g_start)
    pad_rows = np.repeat(offsets[g_reg] + g_start - np.concatenate([[0], np.cumsum(g_len)[:-1]]), g_len)
    pad_rows += np.arange(int(g_len.sum()))
    padding = np.zeros(total, dtype=bool)
    padding[pad_rows] = True
    for t in labels:
        labels[t][padding] = False
        p_true[t][padding] = np.nan

    # --- observed features
    cols: dict[str, np.ndarray] = {}
    zc = z[cell]
    for name, law in phys.features.items():
        e = rng.standard_normal(n)
        e = law.twist * twist + np.sqrt(1 - law.twist**2) * e
        sd_noise = law.step / np.sqrt(2 * (1 - phys.noise_phi))
        noise = _ar1(rng, (n, width), phys.noise_phi, sd_noise)[cell]
        cols[name] = 10.0 ** (law.mu + law.sd * (law.r * zc + np.sqrt(1 - law.r**2) * e[reg]) + noise)
    r_noise = _ar1(rng, (n, width), phys.noise_phi, phys.r_step / np.sqrt(2 * (1 - phys.noise_phi)))[cell]
    r_obs = np.clip(r_star[cell] + r_noise, 0.0, 5.6)
    zero_latent = 0.6 * rng.standard_normal(n)[reg] + _ar1(rng, (n, width), 0.995, 0.8)[cell]
    r_obs[zero_latent < phys.r_zero_base - phys.r_zero_slope * zc] = 0.0
    cols["R_VALUE"] = r_obs
    alpha_unit = 0.8 * rng.standard_normal(n)[reg] + _ar1(rng, (n, width), 0.98, 0.6)[cell]
    cols["MEANALP"] = phys.alpha_sd * np.exp(phys.alpha_growth * zc) * alpha_unit

    # --- flare-history filler from strictly past flares
    flux_step = _step_max_flux(rng, counts)  # (n, T) W/m^2, 0 where no flare
    n_c_f = n_c.astype(np.float64)
    shifted = np.zeros_like(n_c_f)
    shifted[:, 1:] = n_c_f[:, :-1]
    decay = np.exp(-DT / 0.5)  # 12 h e-folding
    cols["Chis"] = np.cumsum(shifted, axis=1)[cell]
    cols["Chis1d"] = _past_sum(n_c_f, STEPS_PER_DAY)[cell]
    cols["Cdec"] = lfilter([1.0], [1.0, -decay], shifted, axis=1)[cell]
    flux_shift = np.zeros_like(flux_step)
    flux_shift[:, 1:] = flux_step[:, :-1]
    cols["Edec"] = lfilter([1.0], [1.0, -decay], flux_shift / C1, axis=1)[cell]
    cols["Xmax1d"] = maximum_filter1d(flux_shift, size=STEPS_PER_DAY, axis=1, origin=STEPS_PER_DAY // 2 - 1)[cell]
    for name in FEATURE_COLUMNS:
        cols[name][padding] = 0.0

    # --- identities and times: regions born in order, NOAA and HARP numbers increase with time
    # first observed records are increasing in time (so are NOAA numbers); births precede them
    birth = first_step + np.cumsum(rng.exponential(4.0 * STEPS_PER_DAY, size=n).astype(np.int64)) - o_start
    noaa = first_noaa + np.cumsum(rng.integers(1, 4, size=n))
    harp = first_harp + np.cumsum(rng.integers(1, 6, size=n))
    rec_step = birth[reg] + k
    times = START_TIME + rec_step.astype("timedelta64[m]") * 12
    table = pd.DataFrame({
        "DATE__OBS": np.datetime_as_string(times, unit="s"),
        "NOAA_AR": noaa[reg],
        "HARPNUM": harp[reg],
        **{name: cols[name] for name in FEATURE_COLUMNS},
    })
    data = SplitData(table=table, padding=padding, labels=labels, p_true=p_true, z=zc, region_index=reg)
    return data, int(rec_step.max()) + 1, int(noaa[-1]), int(harp[-1])


def _step_max_flux(rng: np.random.Generator, counts: dict[str, np.ndarray]) -> np.ndarray:
    """Largest peak flux (W/m^2) per step, drawn from the index-2 law inside its highest non-empty bin."""
    out = np.zeros(counts["C"].shape)
    bins = (("M5", CLASS_FLUX["M5"], np.inf, None), ("M", CLASS_FLUX["M"], CLASS_FLUX["M5"], "M5"),
            ("C", CLASS_FLUX["C"], CLASS_FLUX["M"], "M"))
    for cls, lo, hi, above in bins:
        nb = counts[cls] - (counts[above] if above else 0)
        idx = np.nonzero(nb * (out == 0))
        m = nb[idx]
        # max of m draws from the truncated Pareto(1) on [lo, hi): invert CDF at V**(1/m)
        u = rng.random(m.size) ** (1.0 / m)
        frac = 1.0 - lo / hi if np.isfinite(hi) else 1.0
        out[idx] = lo / (1.0 - u * frac) * C1
    return out


def simulate(size: str | SizeSpec = "demo", seed: int = 0, physics: Physics | None = None) -> dict[str, SplitData]:
    """Simulate both splits in memory (``{"training": ..., "testing": ...}``); nothing is written.

    ``size`` names one of :data:`SIZES` or is a :class:`SizeSpec` of its own (e.g. more training regions)."""
    if not isinstance(size, SizeSpec) and size not in SIZES:
        raise ValueError(f"invalid size {size!r}: expected one of {sorted(SIZES)}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"invalid seed {seed!r}: expected a non-negative integer")
    spec = size if isinstance(size, SizeSpec) else SIZES[size]
    phys = physics or Physics()
    rng_train, rng_test = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))
    train, end, noaa, harp = _simulate_split(rng_train, spec, spec.train_regions, 0, FIRST_NOAA, 0, phys)
    # a month's gap: every test record is later than every training record
    test, _, _, _ = _simulate_split(rng_test, spec, spec.test_regions, end + 30 * STEPS_PER_DAY, noaa + 1, harp + 1,
                                    phys)
    return {"training": train, "testing": test}


def truth_path(csv_path: str | Path) -> Path:
    """The sidecar of a data file: ``D/training_data_M_24.csv`` -> ``D/truth/training_data_M_24.csv``.

    A sub-folder keeps the data folder itself to exactly the 18 tables of the real layout."""
    p = Path(csv_path)
    return p.parent / "truth" / p.name


def is_synthetic(csv_path: str | Path) -> bool:
    """Whether a data file was written by this generator (its truth sidecar lies beside it)."""
    return truth_path(csv_path).is_file()


def _count_rows(path: Path) -> int:
    """Data rows of a CSV file (lines after the header), counted without parsing."""
    n = 0
    last = b"\n"
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n") - 1


def load_truth(csv_path: str | Path) -> np.ndarray:
    """The generator's true P probability per row of ``csv_path`` (NaN on padding rows).

    Raises FileNotFoundError if the sidecar is missing and ValueError if its row count differs from the CSV's.
    """
    csv_path = Path(csv_path)
    side = truth_path(csv_path)
    if not side.is_file():
        raise FileNotFoundError(f"no truth sidecar for {csv_path}: expected {side} (written by everest.data.synthetic)")
    truth = pd.read_csv(side)
    if list(truth.columns) != ["p_true"]:
        raise ValueError(f"{side}: expected exactly one column 'p_true', got {list(truth.columns)}")
    n_csv = _count_rows(csv_path)
    if len(truth) != n_csv:
        raise ValueError(f"{side} has {len(truth)} rows but {csv_path} has {n_csv} data rows")
    return truth["p_true"].to_numpy(dtype=np.float64)


def generate(out_dir: str | Path, size: str = "demo", seed: int = 0) -> list[Path]:
    """Write the 18 data files and their 18 truth sidecars to ``out_dir``; return the CSV paths.

    Same ``size`` and ``seed`` give byte-identical files. Raises ValueError for an unknown size or bad seed.
    """
    splits = simulate(size, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = ",".join(COLUMNS) + "\n"
    paths: list[Path] = []
    for split, data in splits.items():
        # the 17 shared columns are formatted once per split; files differ only in the Flare column
        body = data.table.to_csv(index=False, header=False, float_format=_FLOAT_FORMAT, lineterminator="\n")
        lines = body.split("\n")[:-1]
        for target in all_targets():
            path = out / f"{split}_data_{target.file_suffix}.csv"
            flare = data.flare_column(target)
            io.write_text(path, header + "".join(map("{},{}\n".format, flare, lines)))
            p = data.p_true[target]
            truth = pd.DataFrame({"p_true": p}).to_csv(index=False, float_format="%.9g", na_rep="NaN",
                                                        lineterminator="\n")
            io.write_text(truth_path(path), truth)
            paths.append(path)
    return paths
