"""Random float32 weights for the small model configs of the model tests."""

import numpy as np

from jaxserve.models.llama import nest_params, param_specs
from jaxserve.models.model_config import ModelConfig


def random_params(c: ModelConfig, seed: int) -> dict:
    """Normal(0, 0.2) weights, norms around 1, nested as the model takes them."""
    rng = np.random.default_rng(seed)
    flat = {path: rng.normal(0, 0.2, shape).astype(np.float32) + (1.0 if "norm" in path else 0)
            for path, (shape, _) in param_specs(c).items()}
    return nest_params(flat)
