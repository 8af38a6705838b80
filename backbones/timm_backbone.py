"""Any timm model as a frozen feature backbone: DINOv2, MAE, ResNet and the rest.

Weights: ``pretrained: true`` downloads timm's default tag through the HuggingFace hub;
``checkpoint: /path/model.safetensors`` loads a local file instead (timm's
``pretrained_cfg_overlay={'file': ...}``); ``pretrained: false`` keeps random weights, recorded
as such. The paper runs DINOv2-L with patch 16 at 256 px (16 x 16 tokens); timm resamples the
patch-embedding kernel and position table when ``patch_size``/``img_size`` are overridden.
"""
from __future__ import annotations

from typing import Any

import torch

from backbones.base import (BACKBONES, FeatureBackbone, MissingWeightsError, check_file, hub_offline,
                            require_hub_weights, timm_hub_repo,
                            tokens_to_grid)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@BACKBONES.register("timm")
class TimmBackbone(FeatureBackbone):
    def __init__(self, model: str, pretrained: bool = True, checkpoint: str | None = None,
                 input_size: int | None = None, patch_size: int | None = None,
                 model_args: dict[str, Any] | None = None) -> None:
        import timm

        kwargs: dict[str, Any] = dict(model_args or {})
        kwargs["num_classes"] = 0
        is_vit = any(s in model for s in ("vit", "deit", "eva"))
        if is_vit and patch_size:
            kwargs["patch_size"] = int(patch_size)
        if is_vit and input_size:
            kwargs["img_size"] = int(input_size)
        how = (f"Download it on a machine with internet (`hf download timm/{model}`), copy "
               f"model.safetensors here and set backbone.checkpoint=/path/to/model.safetensors, "
               f"or set backbone.pretrained=false for random weights (labelled 'random' in results).")
        if checkpoint:
            path = check_file(checkpoint, f"timm backbone {model}", how)
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            source = f"file:{path}"
        elif pretrained:
            source = f"timm:{model}"
        else:
            source = "random"
        load = bool(checkpoint) or bool(pretrained)
        if load and not checkpoint and hub_offline():
            raise MissingWeightsError(f"timm backbone {model}: pretrained weights requested but "
                                      f"HF_HUB_OFFLINE=1. {how}")
        if load and not checkpoint:
            require_hub_weights(timm_hub_repo(model), f"timm backbone {model}", how)
        try:
            net = timm.create_model(model, pretrained=load, **kwargs)
        except (OSError, RuntimeError) as e:  # hub errors subclass OSError / RuntimeError
            if not load:
                raise
            raise MissingWeightsError(f"timm backbone {model}: could not load pretrained weights "
                                      f"({type(e).__name__}: {str(e)[:200]}). {how}") from e
        dcfg = net.pretrained_cfg or {}
        size = int(input_size or dcfg.get("input_size", (3, 224, 224))[-1])
        super().__init__(size, dcfg.get("mean", IMAGENET_MEAN), dcfg.get("std", IMAGENET_STD))
        self.net = net
        self.model_name = model
        self.num_prefix = int(getattr(net, "num_prefix_tokens", 0))
        self.out_dim = int(net.num_features)
        self.weights_source = source

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.forward_features(x)
        return tokens_to_grid(f, self.num_prefix) if f.dim() == 3 else f
