"""The per-layer capture: which layers it reads, what it records, and when it falls back.

The recorded inputs and output gradients are checked against hand computations of a two-layer
network; the statistics computed from them are checked in ``test_layer_stats.py``.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.core import capture
from unlearn_jax.core.task import Task, flax_task

RTOL_F32 = 1e-5  # the same float32 operations in a different order


class AllKnown(nn.Module):
    """One of every layer type the capture knows."""

    @nn.compact
    def __call__(self, x):  # x [B, 6, 6, 2]
        h = nn.Conv(3, (3, 3), strides=2)(x)
        h = nn.GroupNorm(num_groups=1)(h)
        h = nn.DenseGeneral((2, 2), axis=-1)(h)  # [B, 3, 3, 2, 2]
        h = h.reshape(h.shape[0], 9, 4)
        h = nn.RMSNorm()(h)
        h = nn.Dense(3)(h).reshape(h.shape[0], -1)
        tokens = jnp.argmax(h, axis=-1) % 4
        h = nn.LayerNorm()(h + nn.Embed(4, 27)(tokens))
        return nn.Dense(2)(h)


class Scale(nn.Module):
    """A layer type the capture does not know."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("s", nn.initializers.ones, (x.shape[-1],))[None, :]


class WithUnknown(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(Scale()(nn.Dense(4)(x)))


class Tied(nn.Module):
    @nn.compact
    def __call__(self, x):  # token ids [B, T]
        embed = nn.Embed(5, 4)
        return embed.attend(nn.Dense(4)(embed(x)))


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        return jnp.tanh(nn.Dense(carry.shape[-1])(carry)), None


class Lifted(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        h, _ = scan()(nn.Dense(3)(x), None)
        return nn.remat(nn.Dense)(2)(h)


class BatchNotLeading(nn.Module):
    @nn.compact
    def __call__(self, x):  # x [B, T, d]: the middle Dense sees [T, B, d]
        h = nn.Dense(3, name="swapped")(jnp.swapaxes(x, 0, 1))
        return nn.Dense(2, name="head")(jnp.swapaxes(h, 0, 1).reshape(x.shape[0], -1))


class CalledTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(3)
        return shared(x) + shared(2.0 * x)


def _init(module, x, seed=0):
    # One compiled program: an eager init dispatches (and compiles) every operation on its own.
    return jax.jit(module.init)(jax.random.key(seed), x)["params"]


def _shapes(module, x):
    """Parameter shapes only: planning needs no values (and then compiles nothing)."""
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def _fresh_caches():
    # Plans and warnings are cached per model; a test about warnings starts from scratch.
    capture._cached_plan.cache_clear()
    capture._warn_once.cache_clear()


def _plan_with_warnings(model, params, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = capture.plan_capture(model, params, x)
    return plan, [w for w in caught if "per-layer capture" in str(w.message)]


def test_every_known_layer_is_captured_without_warning():
    _fresh_caches()
    x = jnp.ones((3, 6, 6, 2))
    model = flax_task(AllKnown())
    plan, caught = _plan_with_warnings(model, _shapes(AllKnown(), x), x)
    kinds = {spec.module_type: spec.kind for spec in plan.layers}
    assert kinds == {
        "Conv": "conv",
        "GroupNorm": "scale_bias",
        "DenseGeneral": "dense",
        "RMSNorm": "scale_bias",
        "Dense": "dense",
        "Embed": "embed",
        "LayerNorm": "scale_bias",
    }
    assert plan.fallback == () and plan.reasons == () and caught == []
    conv = next(spec for spec in plan.layers if spec.kind == "conv")
    # SAME padding of a 6-wide input, window 3, stride 2: XLA pads (0, 1) (lax.padtype_to_pads).
    assert conv.calls[0].padding == ((0, 1), (0, 1)) and conv.calls[0].out_spatial == (3, 3)
    assert conv.matrix == (3 * 3 * 2, 3)


def test_recorded_inputs_and_output_grads_match_hand_computation():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(4, name="hidden")(x)))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    y = jnp.asarray([0, 2, 1, 1, 0])
    params = _init(Net(), x)
    caps = jax.jit(lambda p, b: capture.capture(flax_task(Net()), p, b))(params, {"x": x, "y": y})

    w1, b1, w2, b2 = (
        np.asarray(params[layer][name], np.float64)
        for layer in ("hidden", "head")
        for name in ("kernel", "bias")
    )
    hidden = np.tanh(np.asarray(x, np.float64) @ w1 + b1)
    logits = hidden @ w2 + b2
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # d(sum_i CE_i)/d logits_i = softmax(logits_i) - onehot(y_i); back through tanh: (1 - h^2).
    d_head = probs - np.eye(3)[np.asarray(y)]
    d_hidden = (d_head @ w2.T) * (1 - hidden**2)
    np.testing.assert_allclose(caps.inputs["hidden"][0][:, 0], x, rtol=RTOL_F32)
    np.testing.assert_allclose(caps.inputs["head"][0][:, 0], hidden, rtol=RTOL_F32)
    np.testing.assert_allclose(caps.grads["head"][0][:, 0], d_head, rtol=RTOL_F32, atol=1e-7)
    np.testing.assert_allclose(caps.grads["hidden"][0][:, 0], d_hidden, rtol=RTOL_F32, atol=1e-7)
    np.testing.assert_allclose(caps.losses, -np.log(probs[np.arange(5), y]), rtol=RTOL_F32)


def test_normalisation_records_the_normalised_input():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, 5)), jnp.float32)
    module = nn.LayerNorm()
    params = {"scale": jnp.full((5,), 2.0), "bias": jnp.full((5,), 0.5)}
    model = (module, lambda out, batch: jnp.sum(out, axis=(1, 2)))
    caps = capture.capture(model, params, {"x": x})
    mean = x.mean(-1, keepdims=True)
    x_hat = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(caps.inputs["<root>"][0], x_hat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(caps.grads["<root>"][0], np.ones_like(x))


def test_unknown_layer_falls_back_per_leaf_and_warns_once():
    _fresh_caches()
    x = jnp.ones((4, 2))
    params = _shapes(WithUnknown(), x)
    model = flax_task(WithUnknown())
    plan, first = _plan_with_warnings(model, params, x)
    _, again = _plan_with_warnings(model, params, x)
    _, other_batch = _plan_with_warnings(model, params, jnp.ones((7, 2)))
    assert plan.fallback == (("Scale_0", "s"),)
    # In the order of their first call: Dense_1 (created second) runs first.
    assert [spec.name for spec in plan.layers] == ["Dense_1", "Dense_0"]
    assert len(first) == 1 and again == [] and other_batch == []
    assert "Scale_0 (Scale)" in str(first[0].message)


def test_tied_embedding_falls_back_and_the_dense_layer_is_kept():
    _fresh_caches()
    x = jnp.zeros((3, 4), jnp.int32)
    plan, caught = _plan_with_warnings(flax_task(Tied(), "sequence"), _shapes(Tied(), x), x)
    assert plan.fallback == (("Embed_0", "embedding"),)
    assert [spec.name for spec in plan.layers] == ["Dense_0"]
    assert len(caught) == 1 and "Embed.attend" in str(caught[0].message)


def test_layers_inside_lifted_transforms_fall_back():
    _fresh_caches()
    x = jnp.ones((3, 2))
    plan, caught = _plan_with_warnings(flax_task(Lifted()), _shapes(Lifted(), x), x)
    assert [spec.name for spec in plan.layers] == ["Dense_0"]
    assert {k[0] for k in plan.fallback} == {"ScanScanBlock_0", "CheckpointDense_0"}
    assert len(caught) == 1 and "lifted transform" in str(caught[0].message)


def test_layer_whose_input_does_not_lead_with_the_batch_falls_back():
    _fresh_caches()
    x = jnp.ones((4, 4, 2))  # B == T on purpose: only the second trace (B + 1) tells them apart
    plan, caught = _plan_with_warnings(
        flax_task(BatchNotLeading()), _shapes(BatchNotLeading(), x), x
    )
    assert [spec.name for spec in plan.layers] == ["head"]
    assert {k[0] for k in plan.fallback} == {"swapped"}
    assert "leading axis" in str(caught[0].message)


def test_a_layer_called_twice_is_captured_once_per_call():
    x = jnp.ones((2, 3))
    plan = capture.plan_capture(flax_task(CalledTwice()), _shapes(CalledTwice(), x), x)
    (spec,) = plan.layers
    assert len(spec.calls) == 2 and plan.fallback == ()


def test_task_without_module_uses_the_generic_path():
    _fresh_caches()
    params = {"w": jnp.ones((2, 3))}
    task = Task(apply=lambda p, x: x @ p["w"])
    plan, caught = _plan_with_warnings(task, params, jnp.ones((4, 2)))
    assert plan.layers == () and plan.fallback == (("w",),) and len(caught) == 1


def test_bad_models_and_losses_raise():
    with pytest.raises(TypeError, match="expected a Task"):
        capture.as_capture_model(lambda p, x: x)
    x = jnp.ones((4, 2))
    params = _init(nn.Dense(3), x)
    with pytest.raises(ValueError, match=r"per-example losses of shape \(4,\)"):
        capture.capture((nn.Dense(3), lambda out, batch: jnp.sum(out)), params, {"x": x})
