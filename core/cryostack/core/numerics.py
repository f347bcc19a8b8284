"""Small numerics every stage needs, written once: softmax and log-sum-exp over one axis, seeded random streams.

Random streams. A job's every draw comes from a generator seeded by ``(seed, purpose, iteration)``: one stream
per purpose, so that draws for one purpose never shift another's, and per iteration, so that a run resumed from
a checkpoint continues exactly as the uninterrupted run (docs/architecture.md, "Randomness").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryostack.core.backend import array_module


def softmax(scores: Any, axis: int = -1) -> Any:
    """Normalised ``exp(scores)`` along ``axis``, computed stably (numpy or cupy, same shape as ``scores``)."""
    xp = array_module(scores)
    shifted = xp.exp(scores - scores.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def log_sum_exp(values: Any, axis: int = -1) -> Any:
    """``log Σ exp(values)`` along ``axis``, computed stably; the axis is removed."""
    xp = array_module(values)
    peak = values.max(axis=axis, keepdims=True)
    return (xp.log(xp.exp(values - peak).sum(axis=axis, keepdims=True)) + peak).squeeze(axis)


def seed_sequence(seed: int, purpose: int, iteration: int = 0) -> np.random.SeedSequence:
    """The seed of one purpose's stream at one iteration of a job seeded by ``seed``."""
    return np.random.SeedSequence(int(seed), spawn_key=(int(purpose), int(iteration)))


def random_stream(seed: int, purpose: int, iteration: int = 0) -> np.random.Generator:
    """The generator of one purpose's stream at one iteration (see the module docstring)."""
    return np.random.default_rng(seed_sequence(seed, purpose, iteration))


def floored_log_prior(class_mass: np.ndarray, min_fraction: float) -> np.ndarray:
    """Class log-priors (K,) from occupancies (K,), each prior at least ``min_fraction`` of uniform before
    normalising, so that no class's prior can fall to zero and keep it empty."""
    k_count = class_mass.shape[0]
    prior = np.maximum(class_mass, min_fraction / k_count)
    return np.log(prior / prior.sum())
