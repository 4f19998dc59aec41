"""Thin Prefect tasks, one per pipeline step; the maths lives in mepf_core, files in storage."""
