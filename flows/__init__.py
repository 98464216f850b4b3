"""Prefect flows and the `deepfield` command line: ingest (ingest.py), processing and merge tasks (process.py,
merge.py) of the run flow (run.py), scheduled reprocessing (schedule.py), the commands (cli.py,
cli_models.py, cli_detect.py, cli_anomaly.py, cli_photoz.py) and the evaluation flows with their baselines (evaluate/). Nothing else imports
this package."""
