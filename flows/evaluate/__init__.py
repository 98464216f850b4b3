"""Evaluation flows: each model scored on held-out simulated data beside its classical baseline."""
