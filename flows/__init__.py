"""Prefect flows and the `deepfield` command line."""
