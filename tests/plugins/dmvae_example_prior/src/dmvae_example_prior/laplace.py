"""An i.i.d. Laplace prior: heavier tails than N(0, I), no closed-form score on the flow path,
so the benchmark trains a teacher for it automatically."""
import torch

from priors import PRIORS


@PRIORS.register("laplace")
class LaplacePrior:
    class_conditional = False

    def __init__(self, latent_shape, scale=0.7, **_):
        self.name, self.latent_shape, self.scale = "laplace", tuple(latent_shape), float(scale)

    def fit(self, ctx):
        return None

    def sample(self, n, generator=None, labels=None):
        # Inverse CDF of Laplace(0, b): -b sign(u) log(1 - 2|u|), u ~ U(-1/2, 1/2).
        u = torch.rand(n, *self.latent_shape, generator=generator) - 0.5
        return -self.scale * u.sign() * torch.log1p(-2 * u.abs())

    def state_dict(self):
        return {"scale": torch.tensor(self.scale)}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
