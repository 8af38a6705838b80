"""A prior fitted by a training-data stage of its own, declared by the plug-in alone.

p_ref = a Gaussian whose per-position mean and standard deviation are those of the training
images, average-pooled to the latent grid and repeated over the latent channels, then scaled so
that its mean variance per value is 1 (the scale of N(0, I)). The moments come from a stage this
package adds, ``example_image_moments``, which the grid runs once per dataset and image count
and shares between every cell that needs it; the prior names it in ``upstream`` and receives
its output in ``ctx.inputs``. Nothing in the benchmark's repository names either of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmark.data import load_images, subset
from benchmark.store import load_torch, save_torch
from benchmark.upstream import Need, data_slice, register_stage
from priors import PRIORS

STAGE = "example_image_moments"


# ---- the stage: run(node) writes its outputs and returns the facts for its record; output(node)
# is what a dependant receives.

def run(node) -> dict:
    p = node.params
    d = p["data"]
    images = subset(load_images(d["name"], "train", int(d["resolution"])), int(p["n_images"]), seed=0)
    x = images.float_batch(torch.arange(len(images)))
    mean, std = x.mean(0), x.std(0)
    save_torch(node.dir / "moments.pt", {"mean": mean, "std": std})
    return {"moments_images": len(images), "moments_pixel_mean": float(mean.mean())}


def output(node) -> dict:
    return load_torch(node.dir / "moments.pt")


register_stage(STAGE, version=1, module=__name__, doc="per-pixel mean and std of training images")


# ---- the prior

@PRIORS.register("image-moments")
class ImageMomentsPrior:
    class_conditional = False

    def __init__(self, latent_shape, n_images: int = 512, label: str | None = None):
        self.name = label or "image-moments"
        self.latent_shape, self.n_images = tuple(latent_shape), int(n_images)
        self.mean = torch.zeros(self.latent_shape)
        self.std = torch.ones(self.latent_shape)

    @classmethod
    def upstream(cls, cfg: dict) -> dict:
        return {"moments": Need(STAGE, {"data": data_slice(cfg), "n_images": int(cfg["prior"].get("n_images", 512))})}

    def fit(self, ctx) -> None:
        if "moments" not in ctx.inputs:
            raise ValueError(f"image-moments needs the output of its {STAGE!r} stage in ctx.inputs['moments']")
        c, h, w = self.latent_shape
        m = ctx.inputs["moments"]
        mean = F.adaptive_avg_pool2d(m["mean"].mean(0, keepdim=True)[None], (h, w))[0].expand(c, h, w)
        std = F.adaptive_avg_pool2d(m["std"].mean(0, keepdim=True)[None], (h, w))[0].expand(c, h, w)
        scale = (mean.var() + std.pow(2).mean()).sqrt()
        self.mean, self.std = ((mean - mean.mean()) / scale).contiguous(), (std / scale).contiguous()

    def sample(self, n, generator=None, labels=None):
        return self.mean + self.std * torch.randn(n, *self.latent_shape, generator=generator)

    def state_dict(self):
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state):
        self.mean, self.std = state["mean"], state["std"]
