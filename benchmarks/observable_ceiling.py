"""How much of the generator's Bayes ceiling the 9 features can reach at all, given far more data.

    python benchmarks/observable_ceiling.py [--more 10] [--targets C-72 M-24 M5-48]

The sidecar ``p_true`` is the flare probability given the generator's latent state (exact size, R offset,
twist, emergence), not given what the features show. This script fits a logistic regression and a
gradient-boosted classifier on windows of the 9 EVEREST features from ``--more`` times the ``demo``
training regions (same generator and seed, so the test split is the ``demo`` test split) and prints their
best test TSS and ROC AUC beside the ceiling's: a ceiling far above what plentiful data reaches is
information the features do not carry.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from everest.config import EverestConfig, Target
from everest.data import synthetic as S
from everest.scoring import metrics as M


def windows(split: S.SplitData, features: tuple[str, ...], seq_len: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose last ``seq_len`` records are real and of one region, and their window summary
    (last value, mean and change of each signed-log feature)."""
    x = split.table[list(features)].to_numpy()
    x = np.sign(x) * np.log1p(np.abs(x))
    idx = np.arange(len(x))
    start = idx - (seq_len - 1)
    ok = start >= 0
    ok[ok] &= split.region_index[start[ok]] == split.region_index[ok]
    pads = np.concatenate([[0], np.cumsum(split.padding)])
    ok[ok] &= pads[idx[ok] + 1] == pads[start[ok]]
    rows = idx[ok]
    w = np.stack([x[rows - k] for k in range(seq_len)], axis=1)  # (n, L, F), w[:, 0] is the last record
    return rows, np.concatenate([w[:, 0], w.mean(axis=1), w[:, 0] - w[:, -1]], axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--more", type=int, default=10, help="training regions, in multiples of demo's (default 10)")
    p.add_argument("--targets", nargs="+", default=["C-72", "M-24", "M5-48"])
    args = p.parse_args(argv)
    features = EverestConfig().data.features
    demo = S.SIZES["demo"]
    more = replace(demo, train_regions=demo.train_regions * args.more)
    train, test = S.simulate(more, 0)["training"], S.simulate("demo", 0)["testing"]
    r_train, x_train = windows(train, features)
    r_test, x_test = windows(test, features)
    print(f"{'target':>7} {'train pos':>9} {'LR TSS':>7} {'GBM TSS':>8} {'ceiling':>8} {'LR AUC':>7} {'GBM AUC':>8} "
          f"{'ceil AUC':>8}")
    for name in args.targets:
        t = Target.parse(name)
        y, y_test, p_true = train.labels[t][r_train], test.labels[t][r_test], test.p_true[t][r_test]
        lr = LogisticRegression(max_iter=5000).fit(x_train[:, :len(features)], y)
        p_lr = lr.predict_proba(x_test[:, :len(features)])[:, 1]
        gbm = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, random_state=0).fit(x_train, y)
        p_gbm = gbm.predict_proba(x_test)[:, 1]
        with M.ignore_undefined():
            print(f"{name:>7} {int(y.sum()):>9} {M.max_tss(y_test, p_lr):>7.3f} {M.max_tss(y_test, p_gbm):>8.3f} "
                  f"{M.max_tss(y_test, p_true):>8.3f} {M.roc_auc(y_test, p_lr):>7.3f} {M.roc_auc(y_test, p_gbm):>8.3f} "
                  f"{M.roc_auc(y_test, p_true):>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
