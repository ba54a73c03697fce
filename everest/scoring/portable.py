"""Fitted baselines as plain numeric arrays and a pure-numpy predictor, so a model bundle can ship one and
load it with ``np.load(..., allow_pickle=False)``: nothing is unpickled, and no scikit-learn is needed."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from everest.errors import DataError
from everest.io import write_json, write_npz

FORMAT = "everest-portable-baseline-1"


# ---------------------------------------------------------------------- features
def _step_indices(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window: index of the last real step, of the real step before it (-1: none), of the oldest real step."""
    steps = np.arange(valid.shape[1])
    last = np.where(valid, steps, -1).max(axis=1)
    previous = np.where(valid & (steps < last[:, None]), steps, -1).max(axis=1)
    oldest = np.where(valid, steps, valid.shape[1]).min(axis=1)
    return last, previous, oldest


def last_step(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(N, F): the features of each window's last real step (the current record: always the final step)."""
    last, _, _ = _step_indices(valid)
    return x[np.arange(len(x)), np.maximum(last, 0)]


def window_features(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(N, 3F + 1): ``[last, last - previous real step, last - oldest real step, number of real steps]``.

    Padding steps (front padding and ``padding`` rows inside a window) are skipped; a delta is 0 when the
    window has no earlier real step, so a window with one real step has both deltas 0 and count 1.
    """
    n = np.arange(len(x))
    last_i, prev_i, old_i = _step_indices(valid)
    last = x[n, np.maximum(last_i, 0)]
    d_prev = np.where((prev_i >= 0)[:, None], last - x[n, np.maximum(prev_i, 0)], 0.0)
    d_old = np.where((old_i < last_i)[:, None], last - x[n, np.minimum(old_i, x.shape[1] - 1)], 0.0)
    count = valid.sum(axis=1, keepdims=True)
    return np.concatenate([last, d_prev, d_old, count], axis=1).astype(np.float32)


FEATURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "last_step": last_step, "window_features": window_features}

# Per model, each array's dtype kind (f float, i signed integer, b bool) and number of dimensions.
_NODE_ARRAYS = ("value", "feature", "threshold", "missing_left", "left", "right", "leaf")
ARRAYS: dict[str, dict[str, tuple[str, int]]] = {
    "logistic": {"coef": ("f", 1), "intercept": ("f", 0)},
    "boosted": {"value": ("f", 1), "feature": ("i", 1), "threshold": ("f", 1), "missing_left": ("b", 1),
                "left": ("i", 1), "right": ("i", 1), "leaf": ("b", 1), "tree_start": ("i", 1),
                "baseline": ("f", 0)},
}
_KINDS = {"f": "floating point", "i": "signed integer", "b": "bool"}


@dataclass(frozen=True)
class PortableBaseline:
    """A fitted binary baseline: ``model`` (a key of :data:`ARRAYS`), its input ``features`` (a key of
    :data:`FEATURES`) and its parameters as plain arrays."""

    model: str
    features: str
    arrays: dict[str, np.ndarray]

    @classmethod
    def from_estimator(cls, model: str, features: str, est: Any) -> PortableBaseline:
        """Export a fitted binary ``LogisticRegression`` ("logistic") or ``HistGradientBoostingClassifier``
        ("boosted") without categorical splits; anything else raises ValueError."""
        if model == "logistic":
            if est.coef_.shape[0] != 1:
                raise ValueError(f"logistic: {est.coef_.shape[0]} outputs; only a binary model can be exported")
            # The fitted dtype is kept: fitted on float32 features, scikit-learn predicts in float32.
            return cls(model, features, {"coef": est.coef_[0].copy(), "intercept": est.intercept_[0].copy()})
        if model != "boosted":
            raise ValueError(f"unknown model {model!r}; expected one of {', '.join(ARRAYS)}")
        if est.n_trees_per_iteration_ != 1:
            raise ValueError(f"boosted: {est.n_trees_per_iteration_} outputs; only a binary model can be exported")
        nodes = np.concatenate([trees[0].nodes for trees in est._predictors])
        if nodes["is_categorical"].any():
            raise ValueError("boosted: the model has categorical splits, which cannot be exported")
        sizes = [trees[0].nodes.size for trees in est._predictors]
        arrays = {"value": nodes["value"].astype(np.float64), "feature": nodes["feature_idx"].astype(np.int64),
                  "threshold": nodes["num_threshold"].astype(np.float64),
                  "missing_left": nodes["missing_go_to_left"].astype(bool), "left": nodes["left"].astype(np.int64),
                  "right": nodes["right"].astype(np.int64), "leaf": nodes["is_leaf"].astype(bool),
                  "tree_start": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                  "baseline": np.float64(est._baseline_prediction.item()).reshape(())}
        return cls(model, features, arrays)

    def predict_proba(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(N,) float64 probability of class 1 for windows ``x`` (N, T, F) with real-step mask ``valid``."""
        return self.proba_of_features(FEATURES[self.features](x, valid))

    def proba_of_features(self, features: np.ndarray) -> np.ndarray:
        """(N,) float64 probability of class 1 for an (N, k) feature matrix, as scikit-learn computes it."""
        a = self.arrays
        if self.model == "logistic":
            # scikit-learn's own operations: X @ coef_.T with coef_ of shape (1, F), in the features' dtype.
            scores = (features @ a["coef"].reshape(1, -1).T + a["intercept"]).reshape(-1)
            return expit(scores).astype(np.float64)
        return expit(_tree_raw(a, np.asarray(features, dtype=np.float64)))  # HistGradientBoosting's X_DTYPE

    def to_files(self) -> tuple[dict[str, str], dict[str, np.ndarray]]:
        """A JSON-able header and the arrays (:meth:`from_files` reads them back)."""
        return {"format": FORMAT, "model": self.model, "features": self.features}, dict(self.arrays)

    @classmethod
    def from_files(cls, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], source: str) -> PortableBaseline:
        """Check ``header`` and ``arrays`` (from :meth:`to_files`); a problem raises DataError naming ``source``."""
        for key, allowed in (("format", (FORMAT,)), ("model", tuple(ARRAYS)), ("features", tuple(FEATURES))):
            if header.get(key) not in allowed:
                raise DataError(f"{source}: header key {key!r} is {header.get(key)!r}; expected one of {allowed}")
        model = header["model"]
        for key, (kind, ndim) in ARRAYS[model].items():
            if key not in arrays:
                raise DataError(f"{source}: array {key!r} is missing; a {model} baseline needs {list(ARRAYS[model])}")
            a = arrays[key]
            if a.dtype.kind != kind or a.ndim != ndim:
                raise DataError(f"{source}: array {key!r} is {a.dtype} with {a.ndim} dimensions; expected "
                                f"{_KINDS[kind]} with {ndim}")
        if model == "boosted":
            _check_trees(arrays, source)
        return cls(model, header["features"], {key: np.asarray(arrays[key]) for key in ARRAYS[model]})

    def save(self, folder: Path) -> None:
        """Write ``folder/baseline.npz`` then ``folder/baseline.json``, each atomically."""
        header, arrays = self.to_files()
        write_npz(Path(folder) / "baseline.npz", **arrays)
        write_json(Path(folder) / "baseline.json", header)

    @classmethod
    def load(cls, folder: Path) -> PortableBaseline:
        """Read what :meth:`save` wrote, unpickling nothing; a missing or unreadable file raises DataError."""
        json_path, npz_path = Path(folder) / "baseline.json", Path(folder) / "baseline.npz"
        for path in (json_path, npz_path):
            if not path.is_file():
                raise DataError(f"{path} does not exist; expected a saved portable baseline in {folder}")
        try:
            header = json.loads(json_path.read_text())
            with np.load(npz_path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as err:  # zipfile.BadZipFile, JSONDecodeError and object arrays included
            raise DataError(f"cannot read the portable baseline in {folder}: {err}") from None
        if not isinstance(header, dict):
            raise DataError(f"{json_path} must hold a mapping, got {type(header).__name__}")
        return cls.from_files(header, arrays, str(folder))


def _check_trees(a: Mapping[str, np.ndarray], source: str) -> None:
    """Node arrays of one length, ``tree_start`` running from 0 to it through non-empty trees, and every split
    pointing at a feature and at two later nodes of its own tree (so a traversal always ends)."""
    n = a["value"].size
    for key in _NODE_ARRAYS:
        if a[key].size != n:
            raise DataError(f"{source}: array {key!r} has {a[key].size} nodes; expected {n}, as 'value'")
    starts = a["tree_start"]
    if starts.size < 2 or starts[0] != 0 or starts[-1] != n or (np.diff(starts) <= 0).any():
        raise DataError(f"{source}: array 'tree_start' is {starts}; expected increasing offsets from 0 to {n}")
    sizes = np.diff(starts)
    local = np.arange(n) - np.repeat(starts[:-1], sizes)
    size = np.repeat(sizes, sizes)
    split = ~a["leaf"]
    for key in ("left", "right"):
        child = a[key][split]
        if ((child <= local[split]) | (child >= size[split])).any():
            raise DataError(f"{source}: array {key!r} points outside its tree or backwards; expected each split's "
                            f"child index within its own tree and after the split")
    if (a["feature"][split] < 0).any():
        raise DataError(f"{source}: array 'feature' has a negative index at a split; expected indices >= 0")


def _tree_raw(a: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Raw score ``baseline + sum of the leaf values reached``, tree by tree in fitting order (scikit-learn's
    order). A split sends NaN to ``missing_left`` and otherwise left iff ``x <= threshold``."""
    split_features = a["feature"][~a["leaf"]]
    if split_features.size and X.shape[1] <= split_features.max():
        raise ValueError(f"the model splits on feature {split_features.max()}; got only {X.shape[1]} features")
    raw = np.full(len(X), a["baseline"], dtype=np.float64)
    rows = np.arange(len(X))
    for start in a["tree_start"][:-1]:
        node = np.full(len(X), start)
        todo = rows[~a["leaf"][node]]
        while todo.size:  # one level of the tree per pass
            at = node[todo]
            x = X[todo, a["feature"][at]]
            left = np.where(np.isnan(x), a["missing_left"][at], x <= a["threshold"][at])
            node[todo] = start + np.where(left, a["left"][at], a["right"][at])
            todo = todo[~a["leaf"][node[todo]]]
        raw += a["value"][node]
    return raw
