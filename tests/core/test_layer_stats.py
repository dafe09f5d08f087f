"""Statistics from per-layer captures against the generic per-example path.

The reference is ``per_example_grads`` (``vmap(grad)``) materialised in the test, reduced with plain
``jnp`` by the formula each statistic promises: ``sum_i w_i g_i^2``, ``||g_i||^2``, ``<g_i, v>``, and
for projections the explicit Kronecker product ``(P_in ⊗ P_out)^T vec([G_W; g_b])`` and the explicit
dense matrix. Every model is tiny; each test compiles one statistics call and one reference.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import traverse_util

from unlearn_jax.core import capture, layer_stats
from unlearn_jax.core.grads import per_example_grads
from unlearn_jax.core.task import flax_task
from unlearn_jax.models import get_model

# float32 on both sides; the capture sums positions and examples in another order than vmap(grad)
# (observed relative differences up to ~2e-6 of the largest entry).
RTOL_F32 = 2e-5
PROJECTION = layer_stats.Projection(k_in=3, k_out=2, k_dense=5)


# ------------------------------------------------------------------------------------- models


class SequenceNet(nn.Module):
    """Dense layers on sequences (explicit and Gram norms), DenseGeneral with several feature axes
    over non-trailing axes, LayerNorm and RMSNorm on sequences, a dense head on one position."""

    @nn.compact
    def __call__(self, x):  # [B, 4, 3]
        h = nn.LayerNorm()(jnp.tanh(nn.Dense(5)(x)))  # 4 positions, 3 x 5: explicit
        h = jnp.tanh(nn.Dense(8)(nn.RMSNorm()(h[:, :2])))  # 2 positions, 5 x 8: Gram (26 < 40)
        h = nn.DenseGeneral((2, 3), axis=(1, 3))(h.reshape(h.shape[0], 2, 2, 4))  # [B, 2, 2, 3]
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class ConvNet(nn.Module):
    """Strides, explicit and circular padding, kernel and input dilation, extra batch axes,
    GroupNorm."""

    @nn.compact
    def __call__(self, x):  # [B, 7, 6, 2]
        h = nn.Conv(3, (3, 2), strides=(2, 1), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2))(x)
        h = nn.GroupNorm(num_groups=1)(jnp.tanh(h))  # [B, 3, 7, 3]
        h = jnp.tanh(nn.Conv(2, (2, 2), padding="CIRCULAR")(h))  # [B, 3, 7, 2]
        # 1-D over axis 2 with batch axes [B, 3], the input dilated: 13 -> (13 + 2 - 3) / 2 + 1 = 7.
        h = nn.Conv(2, (3,), strides=2, padding=((1, 1),), input_dilation=2)(h)
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class EmbedNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # token ids [B, 6] from a vocabulary of 5: tokens repeat
        embed = nn.Embed(5, 4)
        h = embed(x) + embed(x[:, ::-1])  # called twice: repeats across calls too
        h = h + nn.Embed(5, 4, name="first")(x[:, 0])[:, None, :]  # one token per example
        return nn.Dense(5)(jnp.tanh(h))  # per-position logits [B, 6, 5]


class Scale(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("s", nn.initializers.ones, (x.shape[-1],))[None, None, :]


class FallbackNet(nn.Module):
    """A tied embedding (``attend``) and a layer the capture does not know."""

    @nn.compact
    def __call__(self, x):  # token ids [B, 4]
        embed = nn.Embed(6, 3)
        return embed.attend(nn.Dense(3)(Scale()(embed(x))))


def _sample(rng, kind, shape):
    if kind == "tokens":
        return jnp.asarray(rng.integers(0, 5, size=shape), jnp.int32)
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


# name: (module, task kind, input kind, input shape without batch)
CASES = {
    "sequence": (SequenceNet(), "regression", "normal", (4, 3)),
    "conv": (ConvNet(), "classification", "normal", (7, 6, 2)),
    "embed": (EmbedNet(), "sequence", "tokens", (6,)),
    "fallback": (FallbackNet(), "sequence", "tokens", (4,)),
    "mlp": (get_model("mlp", num_outputs=3, hidden_sizes=(6, 5)), "classification", "normal", (4,)),
    "cnn": (
        get_model("cnn", num_outputs=3, channels=(2, 3), dense_size=4),
        "classification", "normal", (8, 8),
    ),
}  # fmt: skip
BATCH = 7


@functools.cache
def _problem(name, seed=0):
    module, kind, input_kind, shape = CASES[name]
    rng = np.random.default_rng(seed)
    x = _sample(rng, input_kind, (BATCH, *shape))
    # Random parameters of the right shapes (no compiled init): nothing is at zero or one.
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), jnp.float32), shapes
    )
    outputs = jax.eval_shape(module.apply, {"params": params}, x)
    if kind == "classification":
        y = jnp.asarray(rng.integers(0, outputs.shape[-1], size=BATCH), jnp.int32)
    elif kind == "sequence":
        y = jnp.asarray(rng.integers(0, outputs.shape[-1], size=outputs.shape[:2]), jnp.int32)
    else:
        y = jnp.asarray(rng.normal(size=outputs.shape), jnp.float32)
    batch = {"x": x, "y": y, "mask": jnp.asarray([1.0, 0.0, 0.5, 1.0, 2.0, 1.0, 0.0])}
    if kind == "sequence":
        batch["weights"] = jnp.asarray(rng.uniform(size=outputs.shape[:2]), jnp.float32)
    return flax_task(module, kind), params, batch


# ---------------------------------------------------------------------------------- references

KEY = jax.random.key(3)


@functools.partial(jax.jit, static_argnums=0)
def _reference_grads(task, params, batch):
    return per_example_grads(task.loss, params, batch, strategy="vmap")


def _flat(tree, dtype=None):
    flat = traverse_util.flatten_dict(dict(tree))
    return flat if dtype is None else {k: np.asarray(v, dtype) for k, v in flat.items()}


def _assert_close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(got, want, rtol=RTOL_F32, atol=RTOL_F32 * scale, err_msg=what)


def _documented_words(key, leaf, role, block, words=2**14):
    block_key = jax.random.fold_in(jax.random.fold_in(key, leaf), role * 2**24 + block)
    return np.asarray(jax.random.bits(block_key, (words,), jnp.uint32))


def _documented_matrix(key, leaf, role, rows, k, distribution="rademacher", words=2**14):
    """The module docstring's construction, transcribed: blocks of ``words // k`` rows filled
    row-major from the words of ``fold_in(fold_in(key, leaf), role * 2**24 + j)``."""
    per_block = words // k
    blocks = []
    for j in range(-(-rows // per_block)):
        w = _documented_words(key, leaf, role, j, words)[: per_block * k].reshape(per_block, k)
        if distribution == "rademacher":
            values = np.where(w & 1, 1.0, -1.0)
        else:
            uniform = (w >> 9).astype(np.float64) / 2**23  # the high 23 bits, in [0, 1)
            lowest = float(np.nextafter(np.float32(-1.0), np.float32(0.0)))
            values = np.sqrt(2.0) * scipy.special.erfinv(np.maximum(2 * uniform - 1, lowest))
        blocks.append(values / np.sqrt(k))
    return np.concatenate(blocks)[:rows]


def _reference_projection(plan, grads, proj):
    """Explicit Kronecker products ``(P_in ⊗ P_out)^T vec([G_W; g_b])`` of the materialised
    per-example gradients, then ``sum_l g_l R_l`` over the other leaves, in the documented column
    order, with the documented matrices (numpy, float64)."""
    index = {k: i for i, k in enumerate(plan.leaf_keys)}
    columns, dense = [], []
    for spec in plan.layers:
        if spec.kind == capture.SCALE_BIAS:
            dense += [(*spec.path, leaf) for leaf in spec.leaves]
            continue
        leaf = (*spec.path, "embedding" if spec.kind == capture.EMBED else "kernel")
        g = grads[leaf].reshape(BATCH, *spec.matrix)
        if spec.has_bias:
            g = np.concatenate([g, grads[(*spec.path, "bias")].reshape(BATCH, 1, -1)], axis=1)
        p_in = _documented_matrix(KEY, index[leaf], 0, g.shape[1], proj.k_in)
        p_out = _documented_matrix(KEY, index[leaf], 1, g.shape[2], proj.k_out)
        columns.append(g.reshape(BATCH, -1) @ np.kron(p_in, p_out))
    dense += list(plan.fallback)
    if dense:
        columns.append(sum(
            grads[k].reshape(BATCH, -1)
            @ _documented_matrix(KEY, index[k], 2, grads[k][0].size, proj.k_dense)
            for k in dense
        ))  # fmt: skip
    return np.concatenate(columns, axis=1)


def _vector(params):
    return jax.tree_util.tree_map(lambda p: jnp.asarray(np.cos(3.0 * np.asarray(p))), params)


def _check_all(name, chunk_size=None, method="auto", project=True):
    """Every statistic of ``layer_statistics`` against numpy reductions of ``vmap(grad)``."""
    task, params, batch = _problem(name)
    vector = _vector(params)
    got = layer_stats.layer_statistics(
        task, params, batch, fisher=True, sq_norms=True, vector=vector,
        projection=PROJECTION if project else None, key=KEY, chunk_size=chunk_size,
        method=method,
    )  # fmt: skip
    plan = (
        capture.generic_plan(params, BATCH)
        if method == "generic"
        else capture.plan_capture(task, params, batch["x"])
    )
    grads = _flat(_reference_grads(task, params, batch), np.float64)
    flat_v = _flat(vector, np.float64)
    w = np.asarray(batch["mask"], np.float64)
    for leaf, g in grads.items():
        want = np.tensordot(w, g * g, axes=1)
        _assert_close(_flat(got["fisher"])[leaf], want, f"{name} Fisher {leaf}")
    rows = {k: g.reshape(BATCH, -1) for k, g in grads.items()}
    _assert_close(got["sq_norms"], sum(np.sum(r * r, axis=1) for r in rows.values()), name)
    dots = sum(r @ flat_v[k].reshape(-1) for k, r in rows.items())
    _assert_close(got["dots"], dots, f"{name} dots")
    if project:
        _assert_close(got["projection"], _reference_projection(plan, grads, PROJECTION), name)
    return plan


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    # Chunks of 3 on a batch of 7 (two chunks and a remainder) for the per-example reductions of
    # sequences and convolutions; the others run whole (and the MLP on the one-position forms).
    # The models' own MLP and CNN repeat layer types whose projections the first three check
    # (random-number generators are slow to compile on the CPU, so they are left out there).
    ("name", "chunk_size", "project"),
    [
        ("sequence", 3, True),
        ("conv", 3, True),
        ("embed", None, True),
        ("mlp", None, False),
        ("cnn", None, False),
    ],
)
def test_every_layer_type_matches_the_generic_path(name, chunk_size, project):
    plan = _check_all(name, chunk_size=chunk_size, project=project)
    assert plan.fallback == (), plan.reasons


def test_the_cases_cover_every_layer_type_and_both_norm_forms():
    types, gram = set(), []
    for name in ("sequence", "conv", "embed"):
        task, params, batch = _problem(name)
        for spec in capture.plan_capture(task, params, batch["x"]).layers:
            types.add(spec.module_type)
            positions = sum(getattr(call, "positions", 1) for call in spec.calls)
            if spec.kind == "dense" and positions > 1:
                gram.append(positions * sum(spec.matrix) < spec.matrix[0] * spec.matrix[1])
    assert types == {"Dense", "DenseGeneral", "Conv", "Embed", "LayerNorm", "GroupNorm", "RMSNorm"}
    assert set(gram) == {True, False}


def test_fallback_leaves_match_and_the_capture_keeps_the_rest():
    capture._cached_plan.cache_clear()
    capture._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="per-layer capture"):
        plan = _check_all("fallback")
    assert set(plan.fallback) == {("Embed_0", "embedding"), ("Scale_0", "s")}
    assert [spec.name for spec in plan.layers] == ["Dense_0"]


def test_generic_method_is_the_reference():
    _check_all("mlp", method="generic", project=False)  # the fallback test projects generically


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_sampled_fisher_uses_targets_drawn_from_the_model(kind):
    task, params, batch = _problem("mlp")
    task = flax_task(task.module, kind)
    key = jax.random.key(5)
    got = layer_stats.diag_fisher_sampled_sum(task, params, batch, key, num_samples=2)

    @jax.jit
    def reference(params, batch):
        outputs = task.batch_outputs(params, batch)
        total = jax.tree_util.tree_map(jnp.zeros_like, params)
        for s in range(2):  # the documented draws: sample s uses fold_in(key, s)
            sample_key = jax.random.fold_in(key, s)
            if kind == "classification":
                y = jax.random.categorical(sample_key, outputs, axis=-1)
            else:
                y = outputs + jax.random.normal(sample_key, outputs.shape)
            grads = per_example_grads(task.loss, params, {**batch, "y": y}, strategy="vmap")
            squares = jax.tree_util.tree_map(
                lambda g: jnp.tensordot(batch["mask"], g * g, axes=1), grads
            )
            total = jax.tree_util.tree_map(jnp.add, total, squares)
        return jax.tree_util.tree_map(lambda t: t / 2, total)

    want = reference(params, batch)
    jax.tree_util.tree_map(lambda a, b: _assert_close(a, b, kind), got, want)


def test_projection_matrices_follow_the_documented_construction(monkeypatch):
    key = jax.random.key(8)
    p_in, p_out = layer_stats.kronecker_projection_matrices(key, 2, 6, 5, PROJECTION)
    np.testing.assert_allclose(p_in, _documented_matrix(key, 2, 0, 6, 3), rtol=1e-6)
    np.testing.assert_allclose(p_out, _documented_matrix(key, 2, 1, 5, 2), rtol=1e-6)
    gauss = layer_stats.projection_matrix(key, 2, layer_stats.P_IN, 6, 4, "gaussian")
    want = _documented_matrix(key, 2, 0, 6, 4, "gaussian")
    np.testing.assert_allclose(gauss, want, rtol=1e-5, atol=1e-6)  # float32 erfinv
    # 12 words per block: 2 rows of k_dense = 5; a 7-row matrix takes 4 blocks, the last partial.
    monkeypatch.setattr(layer_stats, "_WORDS", 12)
    matrix = layer_stats._matrices(key, [(4, layer_stats.DENSE_MATRIX, 7, 5)], "rademacher")[0]
    np.testing.assert_allclose(matrix, _documented_matrix(key, 4, 2, 7, 5, words=12), rtol=1e-6)
    g = jnp.asarray(np.random.default_rng(6).normal(size=(3, 7)), jnp.float32)
    got = layer_stats._dense_scan([g], [4], key, PROJECTION)  # block by block inside a scan
    _assert_close(got, np.asarray(g, np.float64) @ np.asarray(matrix, np.float64), "dense scan")


def test_compiled_once_per_configuration():
    task, params, batch = _problem("mlp")
    layer_stats.per_example_sq_norms(task, params, batch)
    size = layer_stats._statistics._cache_size()
    other = {**batch, "x": batch["x"] + 1.0}
    layer_stats.per_example_sq_norms(task, jax.tree_util.tree_map(jnp.negative, params), other)
    assert layer_stats._statistics._cache_size() == size


def test_bad_arguments_raise():
    task, params, batch = _problem("mlp")
    with pytest.raises(ValueError, match=r"mask.*shape \(7,\)"):
        layer_stats.diag_fisher_sum(task, params, {**batch, "mask": jnp.ones((7, 1))})
    with pytest.raises(ValueError, match="same tree structure"):
        layer_stats.per_example_dots(task, params, batch, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="key"):
        layer_stats.layer_statistics(task, params, batch, projection=PROJECTION)
    with pytest.raises(ValueError, match="unknown method"):
        layer_stats.diag_fisher_sum(task, params, batch, method="fast")
    with pytest.raises(ValueError, match="kind"):
        pair = (task.module, lambda out, b: jnp.sum(out, axis=1))
        layer_stats.diag_fisher_sampled_sum(pair, params, batch, jax.random.key(0))
    with pytest.raises(ValueError, match="k_in"):
        layer_stats.Projection(k_in=0)
    with pytest.raises(ValueError, match="k_dense=20000 must be at most"):
        layer_stats.Projection(k_dense=20000)
