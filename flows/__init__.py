"""Prefect flows: the end-to-end pipeline and one flow per stage. Flows only compose tasks."""
