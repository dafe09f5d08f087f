"""Models: shapes, numpy references, batch independence, the registry, and accuracy on digits."""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unlearn_jax import data
from unlearn_jax.models import (
    CNN,
    MLP,
    MODELS,
    Linear,
    MLPRegressor,
    ResNet,
    feature_extractor,
    get_model,
    model_config,
    model_task,
)
from unlearn_jax.models import resnet as resnet_module
from unlearn_jax.training import create_train_state, evaluate_accuracy, fit

# float32 forward passes compared with float64 numpy references of the same maths.
RTOL_F32 = 1e-5
ATOL_F32 = 1e-5
KEY = jax.random.key(0)


def _init(model, x, seed=0):
    """Random parameters with the model's tree (N(0, 0.3^2) leaves).

    Only the structure comes from ``model.init`` (traced, never compiled): compiling the
    initialisers costs seconds per model on a CPU, and these tests do not depend on their values.
    """
    shapes = jax.eval_shape(model.init, KEY, x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


@functools.cache
def _jitted_apply(model):
    # One jitted apply per model configuration (bound methods of equal modules differ).
    return jax.jit(model.apply)


def _apply(model, p, x):
    return _jitted_apply(model)({"params": p}, x)


def _images(n, shape=(8, 8, 1), seed=0):
    return np.random.default_rng(seed).uniform(size=(n, *shape)).astype(np.float32)


# Small configurations keep XLA compilation (the dominant cost on a CPU) to a fraction of a second;
# the ResNet one still has a strided stage with a projection shortcut.
SMALL = {
    "linear": {},
    "mlp": {"hidden_sizes": (16,)},
    "mlp_regressor": {"hidden_sizes": (16,)},
    "cnn": {"channels": (4, 8), "dense_size": 16},
    "resnet": {"stage_sizes": (1, 1), "widths": (4, 8), "num_groups": 2},
}
assert set(SMALL) == set(MODELS)


@functools.cache
def _small(name, num_outputs=3):
    """``(model, params, x)`` of the small configuration, built once per session."""
    model = get_model(name, num_outputs=num_outputs, **SMALL[name])
    x = _images(4)
    return model, _init(model, x), x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_a_batch_to_k_outputs(name):
    model, params, x = _small(name)
    assert _apply(model, params, x).shape == (4, 3)
    assert "head" in params


def test_the_default_models_build_with_the_documented_shapes():
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    shapes = {
        name: jax.eval_shape(get_model(name, num_outputs=10).init, key, x)["params"]
        for name in MODELS
    }
    assert shapes["linear"]["head"]["kernel"].shape == (64, 10)
    assert shapes["mlp"]["hidden_1"]["kernel"].shape == (128, 128)
    assert shapes["mlp_regressor"]["hidden_1"]["kernel"].shape == (64, 64)
    # 8x8 -> 4x4 -> 2x2 after two poolings, 64 channels.
    assert shapes["cnn"]["dense"]["kernel"].shape == (2 * 2 * 64, 256)
    assert shapes["resnet"]["head"]["kernel"].shape == (64, 10)
    assert shapes["resnet"]["blocks_2"]["projection"]["kernel"].shape == (1, 1, 32, 64)
    mnist = jax.ShapeDtypeStruct((2, 28, 28), jnp.float32)
    cnn28 = jax.eval_shape(get_model("cnn", num_outputs=10).init, key, mnist)["params"]
    assert cnn28["dense"]["kernel"].shape == (7 * 7 * 64, 256)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("cnn", (28, 28)), ("cnn", (28, 28, 1)), ("cnn", (32, 32, 3)), ("resnet", (7, 5, 2))],
)
def test_convolutional_models_take_images_with_or_without_channels(name, shape):
    model = get_model(name, num_outputs=3, **SMALL[name])
    x = _images(2, shape)
    assert _apply(model, _init(model, x), x).shape == (2, 3)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_convolutional_models_reject_flat_inputs_with_a_clear_error(name):
    model = get_model(name, num_outputs=3)
    with pytest.raises(ValueError, match=r"\[B, H, W\] or \[B, H, W, C\].*\(4, 64\)"):
        jax.eval_shape(model.init, jax.random.key(0), np.zeros((4, 64), np.float32))


def test_linear_is_an_affine_map_of_the_flattened_input():
    model = Linear(num_outputs=4)
    x = _images(6)
    p = _init(model, x)
    w, b = np.asarray(p["head"]["kernel"], np.float64), np.asarray(p["head"]["bias"], np.float64)
    want = x.reshape(6, -1).astype(np.float64) @ w + b
    np.testing.assert_allclose(_apply(model, p, x), want, rtol=RTOL_F32, atol=ATOL_F32)


def test_mlp_matches_a_numpy_forward_pass():
    model = MLP(num_outputs=3, hidden_sizes=(16, 8), activation="tanh")
    x = _images(4)
    p = _init(model, x)
    h = x.reshape(4, -1).astype(np.float64)
    for layer in ("hidden_0", "hidden_1"):
        h = np.tanh(h @ np.asarray(p[layer]["kernel"], np.float64) + np.asarray(p[layer]["bias"]))
    want = h @ np.asarray(p["head"]["kernel"], np.float64) + np.asarray(p["head"]["bias"])
    np.testing.assert_allclose(_apply(model, p, x), want, rtol=RTOL_F32, atol=ATOL_F32)


def test_mlp_without_hidden_layers_is_the_linear_model():
    x = _images(3)
    mlp, lin = MLP(num_outputs=5, hidden_sizes=()), Linear(num_outputs=5)
    p = _init(lin, x)
    np.testing.assert_array_equal(_apply(mlp, p, x), _apply(lin, p, x))


def test_cnn_matches_a_numpy_forward_pass():
    model = CNN(num_outputs=2, channels=(3,), dense_size=4)
    x = _images(2, (4, 4, 1))
    p = _init(model, x)
    k = np.asarray(p["convs_0"]["kernel"], np.float64)  # [3, 3, 1, 3]
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros((2, 4, 4, 3))
    for i in range(4):
        for j in range(4):
            conv[:, i, j, :] = np.einsum("bhwc,hwcd->bd", padded[:, i : i + 3, j : j + 3, :], k)
    conv = np.maximum(conv + np.asarray(p["convs_0"]["bias"]), 0)
    pooled = conv.reshape(2, 2, 2, 2, 2, 3).max(axis=(2, 4))  # 2x2 max-pool, stride 2
    h = np.maximum(
        pooled.reshape(2, -1) @ np.asarray(p["dense"]["kernel"]) + np.asarray(p["dense"]["bias"]), 0
    )
    want = h @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])
    np.testing.assert_allclose(_apply(model, p, x), want, rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_features_times_head_gives_the_outputs(name):
    model, p, x = _small(name)
    phi = np.asarray(jax.jit(feature_extractor(model))(p, x), np.float64)
    assert phi.ndim == 2 and phi.shape[0] == x.shape[0]
    want = phi @ np.asarray(p["head"]["kernel"], np.float64) + np.asarray(p["head"]["bias"])
    np.testing.assert_allclose(_apply(model, p, x), want, rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_are_per_example(name):
    """No BatchNorm: example i's output does not depend on the rest of the batch."""
    model, p, x = _small(name)
    whole = _apply(model, p, x)
    alone = jnp.concatenate([_apply(model, p, x[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(whole, alone, rtol=RTOL_F32, atol=ATOL_F32)


def test_resnet_per_example_gradients_equal_single_example_gradients():
    """vmap'd per-example gradients are the gradients of each example alone (GroupNorm, no BN)."""
    model, p, x = _small("resnet")
    task = model_task(model)
    y = np.array([0, 1, 2, 1], np.int32)
    per_example = jax.jit(jax.vmap(jax.grad(task.loss), in_axes=(None, 0)))(p, {"x": x, "y": y})
    single = jax.jit(jax.grad(task.batch_loss))
    for i in range(4):
        one = single(p, {"x": x[i : i + 1], "y": y[i : i + 1]})
        for got, want in zip(jax.tree.leaves(per_example), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("norm", "groups"), [("group", 4), ("layer", 1)])
def test_resnet_normalisation_uses_each_examples_own_statistics(norm, groups):
    """GroupNorm / LayerNorm over (H, W, channels of a group) of ONE example, as in numpy."""
    layer = resnet_module._norm(norm, 4, 8)
    x = np.random.default_rng(1).normal(size=(3, 5, 5, 8)).astype(np.float32) * 3 + 1
    out = jax.jit(layer.apply)(layer.init(jax.random.key(0), x), x)
    g = x.astype(np.float64).reshape(3, 5, 5, groups, 8 // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_resnet_has_only_parameters():
    model, _, x = _small("resnet")
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(variables) == {"params"}
    assert set(variables["params"]["stem_norm"]) == {"scale", "bias"}


def test_resnet_rejects_groups_that_do_not_divide_the_widths():
    model = ResNet(num_outputs=10, widths=(16, 32), stage_sizes=(1, 1), num_groups=6)
    with pytest.raises(ValueError, match="num_groups=6"):
        jax.eval_shape(model.init, jax.random.key(0), _images(1))


def test_resnet_rejects_mismatched_stage_lists():
    model = ResNet(num_outputs=10, stage_sizes=(1, 1), widths=(16,))
    with pytest.raises(ValueError, match="same length"):
        jax.eval_shape(model.init, jax.random.key(0), _images(1))


def test_get_model_names_the_valid_choices_for_an_unknown_name():
    with pytest.raises(
        ValueError, match=r"unknown model name 'vgg'.*'cnn'.*'linear'.*'mlp'.*'resnet'"
    ):
        get_model("vgg", num_outputs=10)


def test_get_model_rejects_unknown_hyper_parameters_and_bad_sizes():
    with pytest.raises(ValueError, match=r"no hyper-parameter\(s\) \['hidden'\].*hidden_sizes"):
        get_model("mlp", num_outputs=10, hidden=(3,))
    with pytest.raises(ValueError, match="num_outputs"):
        get_model("mlp", num_outputs=0)
    with pytest.raises(ValueError, match=r"hidden_sizes\[1\]"):
        jax.eval_shape(get_model("mlp", num_outputs=2, hidden_sizes=(4, 0)).init, KEY, _images(1))
    with pytest.raises(ValueError, match="activation"):
        jax.eval_shape(get_model("mlp", num_outputs=2, activation="swish2").init, KEY, _images(1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_config_rebuilds_the_same_model(name):
    model = get_model(name, num_outputs=3)
    config = model_config(model)
    assert config["name"] == name
    rebuilt = get_model(**config)
    assert rebuilt == model
    assert dataclasses.asdict(rebuilt) == dataclasses.asdict(model)


def test_model_task_takes_the_models_kind():
    assert model_task(MLP(num_outputs=2)).kind == "classification"
    assert model_task(MLPRegressor(num_outputs=1)).kind == "regression"
    assert model_task(MLP(num_outputs=2), kind="regression").kind == "regression"


def test_feature_extractor_requires_a_features_method():
    import flax.linen as nn

    with pytest.raises(TypeError, match="no `features` method"):
        feature_extractor(nn.Dense(3))


# ---- accuracy on digits (real training, a few seconds each) ---------------------------------------
def _train_digits(name, *, epochs, learning_rate, batch_size, seed=0):
    splits = data.load("digits")
    model = get_model(name, num_outputs=10)
    task = model_task(model)
    state = create_train_state(
        model, splits.train.x[:1], optax.adam(learning_rate), jax.random.key(seed)
    )
    start = time.perf_counter()
    state, history = fit(
        state,
        task,
        splits.train,
        epochs=epochs,
        batch_size=batch_size,
        key=jax.random.key(seed + 1),
        test=splits.test,
        progress=False,
    )
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    return evaluate_accuracy(task, state.params, splits.test), history, seconds


@pytest.mark.slow
def test_mlp_reaches_95_percent_on_digits():
    acc, history, seconds = _train_digits("mlp", epochs=20, learning_rate=1e-3, batch_size=32)
    print(f"MLP digits: test accuracy {acc:.4f} after 20 epochs in {seconds:.2f}s")
    assert history["test_acc"][-1] == acc
    assert acc >= 0.95


@pytest.mark.slow
def test_cnn_reaches_97_percent_on_digits():
    acc, history, seconds = _train_digits("cnn", epochs=15, learning_rate=3e-3, batch_size=64)
    print(f"CNN digits: test accuracy {acc:.4f} after 15 epochs in {seconds:.2f}s")
    assert history["test_acc"][-1] == acc
    assert acc >= 0.97


def test_docstring_examples_run():
    import doctest

    import unlearn_jax.models

    result = doctest.testmod(unlearn_jax.models, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
