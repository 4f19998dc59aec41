"""Files: the release schema and its HDF5 I/O, the budget ledger, datasets, checkpoints, tables."""
