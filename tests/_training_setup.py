"""Small shared training setups for the training and checkpoint tests.

Compiled steps are keyed on the model configuration, the optimizer OBJECT (optax transformations
compare by identity), the batch size and the bucketed dataset size; sharing these across tests lets
one compilation serve many tests, which dominates the suite's time on a CPU.
"""

import numpy as np
import optax

from unlearn_jax.data import Dataset
from unlearn_jax.models import get_model

ADAM = optax.adam(1e-2)
SGD = optax.sgd(0.1)
BATCH = 8


def mlp():
    """The small classifier of most tests: 5 inputs, 8 hidden units, 3 classes."""
    return get_model("mlp", num_outputs=3, hidden_sizes=(8,))


def classification(n=40, d=5, k=3, seed=0, name="cls"):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    centers = rng.normal(size=(k, d)) * 2
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return Dataset(x=x, y=y, ids=np.arange(n) * 3 + 7, name=name, num_classes=k)


def regression(n=10, d=3, seed=0, name="reg"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5][:d]) + 0.3 + 0.1 * rng.normal(size=n)).astype(np.float32)
    return Dataset(x=x, y=y, ids=np.arange(n) + 100, name=name)
