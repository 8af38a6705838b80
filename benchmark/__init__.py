"""The runner of the DMVAE prior benchmark: config, grid, stage DAG, launchers, metrics."""
