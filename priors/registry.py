"""The two plug-in registries of this package: priors and matching losses."""
from benchmark.registry import Registry

PRIORS: Registry = Registry("prior")
LOSSES: Registry = Registry("loss")
