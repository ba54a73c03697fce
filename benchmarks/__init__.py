"""EVEREST benchmark suite (issue 7): ``python -m benchmarks [--quick] [--out DIR]``."""
