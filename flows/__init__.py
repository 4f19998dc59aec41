"""Prefect flows (composition only) and the `mepf` command line."""
