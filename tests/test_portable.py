"""Portable baselines (everest.scoring.portable): exported, saved without pickle, loaded and predicting as
scikit-learn does."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from everest.errors import DataError
from everest.scoring import baselines, portable
from everest.scoring.baselines import BoostedConfig, LogisticConfig
from everest.scoring.portable import PortableBaseline


def _windows(seed: int, n: int = 600, t: int = 10, f: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled-feature windows with front padding (and a few padding rows inside) and labels from the features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, t, f)).astype(np.float32)
    valid = np.arange(t) >= rng.integers(0, t, size=n)[:, None]  # front padding, at least one real step
    valid[rng.random((n, t)) < 0.05] = False
    valid[:, -1] = True
    x[~valid] = 0.0
    score = x[:, -1, 0] + 0.5 * (x[:, -1, 1] - x[:, -2, 1]) + 0.3 * rng.normal(size=n)
    return x, valid, (score > 0.5).astype(int)


@pytest.mark.parametrize("cfg", [LogisticConfig(), BoostedConfig()], ids=["logistic", "boosted"])
def test_round_trip_predicts_like_sklearn(cfg, tmp_path):
    x, valid, y = _windows(0)
    est = cfg.estimator(0).fit(cfg.features(x, valid), y)
    features = {"logistic": "last_step", "boosted": "window_features"}[cfg.model]
    PortableBaseline.from_estimator(cfg.model, features, est).save(tmp_path)
    loaded = PortableBaseline.load(tmp_path)

    x2, v2, _ = _windows(1)
    expected = est.predict_proba(cfg.features(x2, v2))[:, 1]
    got = loaded.predict_proba(x2, v2)
    assert got.dtype == np.float64 and got.shape == (len(x2),)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert 0.05 < expected.mean() < 0.95  # both classes really predicted
    assert all(a.dtype != object and a.dtype.names is None for a in loaded.arrays.values())
    with np.load(tmp_path / "baseline.npz", allow_pickle=False) as npz:
        assert set(npz.files) == set(portable.ARRAYS[cfg.model])


def test_each_baseline_reads_its_features_through_the_portable_functions():
    x, valid, _ = _windows(2)
    np.testing.assert_array_equal(baselines.DEFAULTS["logistic"].features(x, valid), portable.last_step(x, valid))
    np.testing.assert_array_equal(baselines.DEFAULTS["boosted"].features(x, valid),
                                  portable.window_features(x, valid))
    assert portable.FEATURES == {"last_step": portable.last_step, "window_features": portable.window_features}


def test_nan_features_route_like_sklearn():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(800, 3))
    y = (X[:, 0] + rng.normal(scale=0.5, size=800) > 0).astype(int)
    X[rng.random(X.shape) < 0.15] = np.nan  # fitted with missing values: learned NaN directions
    y[np.isnan(X[:, 0])] = 1  # NaN in feature 0 means class 1, so NaNs go to a side of their own
    est = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(X, y)
    model = PortableBaseline.from_estimator("boosted", "window_features", est)
    assert model.arrays["missing_left"].any() and not model.arrays["missing_left"].all()

    X2 = rng.normal(size=(500, 3))
    X2[rng.random(X2.shape) < 0.3] = np.nan
    np.testing.assert_allclose(model.proba_of_features(X2), est.predict_proba(X2)[:, 1], rtol=0, atol=1e-12)


def test_refuses_multiclass_and_categorical():
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(300, 2)), rng.integers(0, 3, size=300)
    with pytest.raises(ValueError, match="binary"):
        PortableBaseline.from_estimator("boosted", "last_step", HistGradientBoostingClassifier(max_iter=3).fit(X, y))
    X[:, 1] = rng.integers(0, 4, size=300)
    est = HistGradientBoostingClassifier(max_iter=5, categorical_features=[1], min_samples_leaf=5)
    with pytest.raises(ValueError, match="categorical"):
        PortableBaseline.from_estimator("boosted", "last_step", est.fit(X, (X[:, 1] % 2).astype(int)))


@pytest.fixture
def saved(tmp_path):
    x, valid, y = _windows(5, n=300)
    est = BoostedConfig(max_iter=5).estimator(0).fit(portable.window_features(x, valid), y)
    PortableBaseline.from_estimator("boosted", "window_features", est).save(tmp_path)
    return tmp_path


@pytest.mark.parametrize("key,value", [("format", "pickle-1"), ("model", "forest"), ("features", "mean")])
def test_corrupted_header_raises_data_error(saved, key, value):
    header = json.loads((saved / "baseline.json").read_text())
    (saved / "baseline.json").write_text(json.dumps({**header, key: value}))
    with pytest.raises(DataError, match=re.escape(f"{saved}: header key '{key}' is '{value}'")):
        PortableBaseline.load(saved)


def test_missing_or_inconsistent_arrays_raise_data_error(saved):
    header, arrays = PortableBaseline.load(saved).to_files()
    with pytest.raises(DataError, match=r"bundle-x: array 'left' is missing"):
        PortableBaseline.from_files(header, {k: v for k, v in arrays.items() if k != "left"}, "bundle-x")
    with pytest.raises(DataError, match=r"bundle-x: array 'leaf' is float64"):
        PortableBaseline.from_files(header, {**arrays, "leaf": arrays["leaf"].astype(float)}, "bundle-x")
    with pytest.raises(DataError, match=r"array 'tree_start'"):
        PortableBaseline.from_files(header, {**arrays, "tree_start": arrays["tree_start"][::-1].copy()}, "bundle-x")
    with pytest.raises(DataError, match=r"array 'right' points outside"):
        PortableBaseline.from_files(header, {**arrays, "right": np.zeros_like(arrays["right"])}, "bundle-x")


def test_missing_file_raises_data_error(saved):
    (saved / "baseline.npz").unlink()
    with pytest.raises(DataError, match="baseline.npz does not exist"):
        PortableBaseline.load(saved)
