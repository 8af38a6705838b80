"""The FeatureBackbone contract and the registry of backbones.

A backbone maps images (float in [0, 1], 1 or 3 channels, any square size) to a feature grid
[N, out_dim, h, w]. It owns its preprocessing (grey -> RGB, resize to ``input_size``, channel
normalisation), so callers never need to know what a model was trained on. ``weights_source``
names where the weights came from ("random" when none were loaded) and goes into every result
row that depends on it: a prior built on random weights must never pass for a pretrained one.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.registry import Registry

BACKBONES: Registry = Registry("backbone")


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights could not be found or downloaded; the message says how to get them."""


def hub_offline() -> bool:
    """True when the HuggingFace hub must not be contacted (HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def is_weights_path(pretrained: object) -> bool:
    """open_clip's ``pretrained`` is a tag (``openai``) or a local weights file; tell them apart."""
    return isinstance(pretrained, str) and (os.sep in pretrained or "/" in pretrained
                                            or pretrained.endswith((".bin", ".pt", ".safetensors")))


def check_file(path: str | os.PathLike, what: str, how: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingWeightsError(f"{what}: checkpoint file {str(p)!r} does not exist. {how}")
    return p


class FeatureBackbone(nn.Module, abc.ABC):
    """Base class: subclasses implement ``features`` on preprocessed RGB input."""

    out_dim: int
    input_size: int
    weights_source: str

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"backbone input must have 1 or 3 channels, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            # Upsampling small images (32 px) to the backbone's native scale keeps its receptive
            # fields meaningful; antialias only matters (and only applies) when shrinking.
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.input_size)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N, 3, input_size, input_size] -> feature grid [N, out_dim, h, w]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.preprocess(x))

    def grid(self) -> int:
        """Side of the feature grid this backbone returns at its input size."""
        with torch.no_grad():
            dev = next(iter(self.parameters())).device
            return int(self.features(torch.zeros(1, 3, self.input_size, self.input_size, device=dev)).shape[-1])


def tokens_to_grid(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """ViT tokens [N, prefix + h*w, D] -> [N, D, h, w] (class/register tokens dropped)."""
    t = tokens[:, num_prefix:]
    side = int(round(t.shape[1] ** 0.5))
    if side * side != t.shape[1]:
        raise ValueError(f"cannot arrange {t.shape[1]} patch tokens on a square grid")
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)


def build_backbone(cfg: dict[str, Any], **overrides: Any) -> FeatureBackbone:
    """Build a backbone from ``{name: ..., **kwargs}`` (kwargs are the entry's own options)."""
    args = {k: v for k, v in dict(cfg).items() if k != "name"}
    args.update(overrides)
    return BACKBONES.get(cfg["name"])(**args)


def hub_endpoint() -> tuple[str, int]:
    """(host, port) of the HuggingFace hub that huggingface_hub will use: $HF_ENDPOINT (a mirror,
    or a local proxy on a cluster) or huggingface.co."""
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HuggingFace hub answers one TCP connect. One probe with a short timeout:
    huggingface_hub itself retries a refused or unanswered request 5 times with back-off
    (measured here: 48 s against a closed port), which is far too long for a config check."""
    import socket
    if hub_offline():
        return False
    try:
        with socket.create_connection(hub_endpoint(), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub_weights(repo: str | None, what: str, how: str) -> None:
    """Raise MissingWeightsError at once when ``repo``'s weights are neither in the local HF
    cache nor downloadable, instead of letting the hub client retry for a minute."""
    if not repo or _hub_cached(repo):
        return
    if not hub_reachable():
        host, port = hub_endpoint()
        raise MissingWeightsError(f"{what}: pretrained weights from {host}/{repo.rstrip('/')} are not in "
                                  f"the local cache and the hub ({host}:{port}) cannot be reached. "
                                  f"Download them on a machine with internet (`hf download "
                                  f"{repo.rstrip('/')}`) and copy the HF cache here. {how}")


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    repo_id = repo_id.rstrip("/")
    return any(isinstance(try_to_load_from_cache(repo_id, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                         "open_clip_pytorch_model.bin"))


def preflight_backbone(cfg: dict[str, Any] | None, what: str) -> None:
    """A backbone section's weights check: the backbone class's own ``preflight`` (the offline
    MAE, whose weights a stage makes, has nothing to check), else :func:`preflight`."""
    if not cfg:
        return
    own = getattr(BACKBONES.get(cfg["name"]), "preflight", None)
    (own or preflight)(cfg, what)


def backbone_upstream(cfg: dict[str, Any], backbone: dict[str, Any] | None) -> dict[str, Any]:
    """The stages a backbone section needs (``upstream(cfg, backbone)`` of its class), by role."""
    if not backbone:
        return {}
    fn = getattr(BACKBONES.get(backbone["name"]), "upstream", None)
    return dict(fn(cfg, backbone) or {}) if callable(fn) else {}


def backbone_overrides(backbone: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """Constructor overrides from the outputs of the stages the backbone declared."""
    out: dict[str, Any] = {}
    for role in getattr(BACKBONES.get(backbone["name"]), "input_roles", ()):
        if role in inputs:
            out.update(inputs[role])
    return out


def preflight(cfg: dict[str, Any] | None, what: str) -> None:
    """Fail before any stage runs when a backbone's or text tower's weights cannot be had:
    a named checkpoint file that does not exist, or hub weights that are neither in the local
    cache nor downloadable. ``what`` names the config key for the message."""
    if not cfg:
        return
    name = cfg.get("name")
    hint = (f"set {what}.checkpoint (timm, mobilenet_v2) or {what}.pretrained (open_clip) to a local "
            f"weights file, or {what}.pretrained=false/null for random weights (labelled 'random')")
    ckpt = cfg.get("checkpoint")
    pretrained = cfg.get("pretrained")
    if name == "open_clip" and is_weights_path(pretrained):
        ckpt, pretrained = pretrained, None
    if ckpt:
        check_file(ckpt, f"{what} ({name})", f"Put the file there, or {hint}.")
        return
    if not pretrained:
        return
    repo = None
    if name == "timm":
        repo = timm_hub_repo(cfg["model"])
    elif name == "open_clip":
        repo = open_clip_hub_repo(cfg.get("model", ""), str(pretrained))
    require_hub_weights(repo, f"{what} ({name} {cfg.get('model', '')})", f"Or {hint}.")


def timm_hub_repo(model: str) -> str | None:
    import timm
    pcfg = timm.models.get_pretrained_cfg(model)
    return getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None


def open_clip_hub_repo(model: str, tag: str) -> str | None:
    import open_clip
    return (open_clip.get_pretrained_cfg(model, tag) or {}).get("hf_hub")
