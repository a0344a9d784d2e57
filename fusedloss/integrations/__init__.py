"""Integrations of fusedloss with training frameworks (optional dependencies,
imported on use): ``fusedloss.integrations.transformers``."""
