"""Training: the loop (``sakd distill``), the objective, its state, schedules, checkpoints, the run log, on-policy
generation and the CE-only run."""
