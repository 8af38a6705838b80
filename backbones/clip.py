"""The CLIP image tower of open_clip as a feature backbone (patch tokens on a grid).

``pretrained`` is an open_clip tag (e.g. ``openai``, ``laion2b_s34b_b79k``) or a local file
path; ``pretrained: null`` keeps random weights (recorded as ``random``). The text tower used
by the text prior is in :mod:`backbones.text` and shares :func:`create_clip`.
"""
from __future__ import annotations

import torch

from backbones.base import (BACKBONES, FeatureBackbone, MissingWeightsError, check_file, hub_offline,
                            is_weights_path, open_clip_hub_repo, require_hub_weights)

# OpenAI CLIP's preprocessing statistics (open_clip.constants.OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def create_clip(model: str, pretrained: str | None, image_size: int | None = None) -> tuple[torch.nn.Module, str]:
    import open_clip

    how = (f"Download the open_clip weights for {model} on a machine with internet and set "
           f"pretrained=/path/to/open_clip_pytorch_model.bin, or pretrained=null for random weights "
           f"(labelled 'random' in results).")
    if is_weights_path(pretrained):
        check_file(pretrained, f"open_clip model {model}", how)
        source = f"file:{pretrained}"
    elif pretrained:
        if hub_offline():
            raise MissingWeightsError(f"open_clip model {model}: tag {pretrained!r} requested but "
                                      f"HF_HUB_OFFLINE=1. {how}")
        require_hub_weights(open_clip_hub_repo(model, str(pretrained)), f"open_clip model {model}", how)
        source = f"open_clip:{model}/{pretrained}"
    else:
        source = "random"
    try:
        # force_image_size: open_clip resamples the position table of loaded weights to it.
        net = open_clip.create_model(model, pretrained=pretrained or None, require_pretrained=bool(pretrained),
                                     force_image_size=image_size)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise MissingWeightsError(f"open_clip model {model}: could not load {pretrained!r} "
                                  f"({type(e).__name__}: {str(e)[:200]}). {how}") from e
    return net.eval(), source


@BACKBONES.register("open_clip")
class CLIPImageBackbone(FeatureBackbone):
    def __init__(self, model: str = "ViT-B-16", pretrained: str | None = "openai",
                 input_size: int | None = None) -> None:
        net, source = create_clip(model, pretrained, int(input_size) if input_size else None)
        visual = net.visual
        if not hasattr(visual, "output_tokens"):
            raise ValueError(f"open_clip model {model}: its image tower ({type(visual).__name__}) "
                             f"does not expose patch tokens; use a ViT CLIP model")
        visual.output_tokens = True
        size = visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        super().__init__(size, CLIP_MEAN, CLIP_STD)
        self.visual = visual
        self.out_dim = int(visual.transformer.width)
        self.weights_source = source

    def features(self, x: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(x)
        side = int(round(tokens.shape[1] ** 0.5))
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
