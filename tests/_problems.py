"""Small problems written in plain JAX, shared by the numerical-core tests.

Kept independent of :mod:`unlearn_jax.models` on purpose: the references here use no library code.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np


def logistic_problem(n=24, d=5, classes=3, seed=0, dtype=jnp.float32):
    """Multinomial logistic regression with an L2 term: params {"w": [d, C], "b": [C]}."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(dtype)
    y = rng.integers(0, classes, size=n).astype(np.int32)
    params = {
        "w": jnp.asarray(rng.normal(size=(d, classes)) * 0.3, dtype),
        "b": jnp.asarray(rng.normal(size=(classes,)) * 0.1, dtype),
    }

    def logits_fn(p, ex):
        return ex["x"] @ p["w"] + p["b"]

    def loss_fn(p, ex):
        logits = logits_fn(p, ex)
        nll = -jax.nn.log_softmax(logits)[ex["y"]]
        return nll + 0.05 * jnp.sum(p["w"] ** 2)

    return params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, loss_fn, logits_fn


def mlp_problem(n=20, d=4, hidden=6, classes=3, seed=1, dtype=jnp.float32):
    """Two-layer tanh MLP with softmax cross-entropy (non-convex)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(dtype)
    y = rng.integers(0, classes, size=n).astype(np.int32)
    params = {
        "l1": {
            "w": jnp.asarray(rng.normal(size=(d, hidden)) * 0.5, dtype),
            "b": jnp.asarray(rng.normal(size=(hidden,)) * 0.1, dtype),
        },
        "l2": {
            "w": jnp.asarray(rng.normal(size=(hidden, classes)) * 0.5, dtype),
            "b": jnp.zeros((classes,), dtype),
        },
    }

    def logits_fn(p, ex):
        h = jnp.tanh(ex["x"] @ p["l1"]["w"] + p["l1"]["b"])
        return h @ p["l2"]["w"] + p["l2"]["b"]

    def loss_fn(p, ex):
        return -jax.nn.log_softmax(logits_fn(p, ex))[ex["y"]]

    return params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, loss_fn, logits_fn


def loop_grads(loss_fn, params, batch):
    """Per-example gradients by a Python loop of jax.grad: the independent reference."""
    n = batch["x"].shape[0]
    grads = [
        jax.grad(loss_fn)(params, jax.tree_util.tree_map(lambda a: a[i], batch)) for i in range(n)
    ]
    return jax.tree_util.tree_map(lambda *g: jnp.stack(g), *grads)


def flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def explicit_hessian(loss_fn, params, batch):
    """[P, P] Hessian of the mean batch loss, by jax.hessian on the flattened parameters."""
    flat_params, unravel = jax.flatten_util.ravel_pytree(params)

    def mean_loss(fp):
        # vmap of the per-example loss: an independent path from the library's hvp (no jvp/grad).
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(unravel(fp), batch))

    return jax.jit(jax.hessian(mean_loss))(flat_params)
