"""Bundled data (drums/: the drum corpus): `solver.data` once installed."""
