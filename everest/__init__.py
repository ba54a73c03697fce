"""EVEREST: solar-flare forecasting from SHARP time series (library; knows nothing of its launcher)."""

__version__ = "0.1.0"
