"""Training one experiment or a group: the epoch loop, the compiled step, stopping, tuning."""
