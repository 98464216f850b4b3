"""PyTorch networks of the science stages, their training loops (over arrays they are given), the model
registry and the shipped weights and model cards. Imports nothing else of deepfield."""
