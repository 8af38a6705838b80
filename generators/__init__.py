"""Latent generators: a class-conditional flow-matching DiT, its probability path, samplers and EMA."""

from .dit import GENERATORS, FlowDiT, build_generator, register_generator
from .ema import EMA
from .sampling import balanced_labels, guided_velocity, random_labels, sample, time_grid
from .transport import (
    flow_matching_loss,
    interpolate,
    sample_t,
    shift_time,
    velocity_target,
    velocity_to_eps,
    velocity_to_x1,
)

__all__ = [
    "EMA",
    "GENERATORS",
    "FlowDiT",
    "balanced_labels",
    "build_generator",
    "flow_matching_loss",
    "guided_velocity",
    "interpolate",
    "random_labels",
    "register_generator",
    "sample",
    "sample_t",
    "shift_time",
    "time_grid",
    "velocity_target",
    "velocity_to_eps",
    "velocity_to_x1",
]
