"""Runs the numerical core sharded over 8 fake CPU devices; executed by test_sharding.py in its own
process, because the fake device count must be set before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax
import jax.numpy as jnp
import numpy as np

from tests._problems import flat, mlp_problem
from unlearn_jax import sharding
from unlearn_jax.core import curvature, grads, solvers


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.data_mesh()
    params, batch, loss_fn, logits_fn = mlp_problem(n=32)
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    sp, sb = sharding.replicate(params, mesh), sharding.shard_batch(batch, mesh)
    assert len(sb["x"].sharding.device_set) == 8

    def all_outputs(p, b):
        matvec = lambda u: curvature.ggn_vp(logits_fn, p, b, u)
        return {
            "pe": grads.per_example_grads(loss_fn, p, b),
            "pe_chunked": grads.per_example_grads(loss_fn, p, b, chunk_size=8),
            "norms": grads.per_example_grad_norms(loss_fn, p, b, chunk_size=8),
            "hvp": curvature.hvp(loss_fn, p, b, v),
            "ggn": matvec(v),
            "ihvp": solvers.inverse_hvp(matvec, v, method="cg", damping=0.1, tol=1e-6).x,
        }

    ref = jax.jit(all_outputs)(params, batch)
    out = jax.jit(all_outputs)(sp, sb)
    # The per-example gradients stay sharded along the batch axis, chunked or not: chunks of 8 of
    # the 32 examples are strided (examples j, j + 4, ...), so each is spread over all 8 devices.
    assert len(out["pe"]["l1"]["w"].sharding.device_set) == 8, out["pe"]["l1"]["w"].sharding
    chunked = out["pe_chunked"]["l1"]["w"]
    assert len(chunked.sharding.device_set) == 8 and not chunked.sharding.is_fully_replicated
    for key in ref:
        np.testing.assert_allclose(
            flat(out[key]), flat(ref[key]), rtol=1e-4, atol=1e-5, err_msg=key
        )
    fisher_ref = curvature.diag_fisher(loss_fn, params, [batch])
    fisher = curvature.diag_fisher(loss_fn, sp, [sb], chunk_size=4)
    np.testing.assert_allclose(flat(fisher), flat(fisher_ref), rtol=1e-5, atol=1e-7)
    print("SHARDING_OK")


if __name__ == "__main__":
    main()
