"""Training machinery behind P4QModule: optimiser and schedule, feature cache, slim checkpoints."""
