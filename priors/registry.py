"""The two plug-in registries of this package: priors and matching losses."""
from benchmark.registry import Registry

PRIORS: Registry = Registry("prior")
# "dmvae_bench.losss" was this group's name before it was spelled correctly; still accepted.
LOSSES: Registry = Registry("loss", plural="losses", legacy_groups=("dmvae_bench.losss",))
