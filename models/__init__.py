"""PyTorch networks of the science stages, their training code, registry and shipped weights."""
