"""The run: the online loop, the pipeline stages before round 1, the run lock, tracking, plots."""
