"""Hydra configs (config.yaml, solver/<name>.yaml): `solver.config` once installed, found by Hydra as pkg://solver.config."""
