"""Text towers for the text prior: per-class captions -> one embedding per caption.

Registry ``TEXT_ENCODERS``; ``open_clip`` runs the CLIP text tower (the paper used SigLIP text
embeddings; SigLIP models are in open_clip too, e.g. ``ViT-B-16-SigLIP`` with tag ``webli``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from backbones.clip import create_clip
from benchmark.registry import Registry

TEXT_ENCODERS: Registry = Registry("text_encoder")


@TEXT_ENCODERS.register("open_clip")
class CLIPText:
    def __init__(self, model: str = "ViT-B-16", pretrained: str | None = "openai") -> None:
        import open_clip
        self.net, self.weights_source = create_clip(model, pretrained)
        self.tokenizer = open_clip.get_tokenizer(model)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), D] unit-norm embeddings (CLIP compares texts by cosine)."""
        emb = self.net.encode_text(self.tokenizer(list(texts))).float()
        return torch.nn.functional.normalize(emb, dim=-1)


def build_text_encoder(cfg: dict[str, Any]):
    args = {k: v for k, v in dict(cfg).items() if k != "name"}
    return TEXT_ENCODERS.get(cfg["name"])(**args)
