"""Using what a study trained: the verified model bundle and the forecaster that reads it."""
