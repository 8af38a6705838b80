"""Registries of encoder and decoder architectures."""
from benchmark.registry import Registry

ENCODERS: Registry = Registry("encoder")
DECODERS: Registry = Registry("decoder")
