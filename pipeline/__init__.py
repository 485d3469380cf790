"""Prefect orchestration of the alexops stages (dvc.yaml stays the one DAG definition)."""
