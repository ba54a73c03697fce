"""EVEREST benchmark suite: ``python -m benchmarks [--quick] [--out DIR]``."""
