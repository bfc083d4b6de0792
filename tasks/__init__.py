"""The stages as a pipeline: the stage table, the identity and completion record of each stage result,
the wiring from a pipeline config to stage specs, the launchers (local, Slurm), MLflow tracking and Prefect
artifacts, and one thin job module per stage (config and input URIs in, outputs and metrics out)."""
