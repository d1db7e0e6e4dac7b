"""A training run: build it from a config, fit it, score it, write its results."""
