"""Forecasts -> numbers: metrics, threshold and calibration, baselines, ensembles, inference."""
