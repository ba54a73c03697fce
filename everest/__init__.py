"""EVEREST: solar-flare forecasting from SHARP time series (library; knows nothing of its launcher)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``everest.Forecaster``, imported on first use (``import everest`` stays light: no torch, no pandas)."""
    if name == "Forecaster":
        from everest.serving.forecaster import Forecaster

        return Forecaster
    raise AttributeError(f"module 'everest' has no attribute {name!r}")
