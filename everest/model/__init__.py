"""The EVEREST network, its losses, and K networks batched as one module for grouped training."""
