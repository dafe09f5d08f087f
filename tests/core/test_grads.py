import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from tests._problems import logistic_problem, loop_grads, mlp_problem
from unlearn_jax.core import cpu_rewrites, grads

RTOL_F32 = 1e-5  # vmap and the loop run the same float32 ops; differences are summation order
ATOL_F32 = 1e-6


def cnn_problem(n=12, seed=2, integer_valued=False):
    """conv 3x3 (2 -> 3 channels) -> ReLU -> 2x2 max-pool -> conv 3x3 stride 2 in NCHW/OIHW
    (3 -> 4) -> ReLU -> min-pool 3x3 stride 2 with SAME padding (overlapping windows) -> dense.

    With ``integer_valued`` the inputs and weights are small integers, so the pooling windows hold
    ties (broken towards the first element by XLA) and every product is exact in float32.
    """
    rng = np.random.default_rng(seed)
    draw = (
        (lambda *s: rng.integers(-2, 3, size=s))
        if integer_valued
        else (lambda *s: rng.normal(size=s))
    )
    x = np.asarray(draw(n, 8, 8, 2), np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    params = {
        "c1": {"w": jnp.asarray(draw(3, 3, 2, 3), jnp.float32), "b": jnp.zeros((3,))},
        "c2": {"w": jnp.asarray(draw(4, 3, 3, 3), jnp.float32), "b": jnp.ones((4,))},
        "d": {"w": jnp.asarray(draw(4 * 1 * 1, 3), jnp.float32), "b": jnp.zeros((3,))},
    }

    def logits_fn(p, ex):
        h = lax.conv_general_dilated(
            ex["x"][None], p["c1"]["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + p["c1"]["b"][None, None, None, :])
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = lax.conv_general_dilated(
            h.transpose(0, 3, 1, 2), p["c2"]["w"], (2, 2), "SAME", dimension_numbers=None
        )  # NCHW / OIHW, 4x4 -> 2x2
        h = jax.nn.relu(h + p["c2"]["b"][None, :, None, None])
        h = lax.reduce_window(h, jnp.inf, lax.min, (1, 1, 3, 3), (1, 1, 2, 2), "SAME")
        return h.reshape(-1) @ p["d"]["w"] + p["d"]["b"]

    def loss_fn(p, ex):
        return -jax.nn.log_softmax(logits_fn(p, ex))[ex["y"]]

    return params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, loss_fn, logits_fn


PROBLEMS = {
    "logistic": logistic_problem,
    "mlp": mlp_problem,
    "cnn": cnn_problem,
    "cnn_ties": functools.partial(cnn_problem, integer_valued=True),
}


@functools.cache
def reference_grads(problem):
    """The Python-loop per-example gradients of a problem, computed once per test session."""
    params, batch, loss_fn, _ = PROBLEMS[problem]()
    return loop_grads(loss_fn, params, batch)


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("strategy", ["vmap", "rewrite"])
# Chunks of 7 leave a remainder on every problem; chunks of one example and chunks larger than the
# batch are test_chunked_map_handles_a_remainder_and_non_gradient_outputs's cases.
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_per_example_grads_match_python_loop(problem, strategy, chunk_size):
    params, batch, loss_fn, _ = PROBLEMS[problem]()
    got = grads.per_example_grads(loss_fn, params, batch, chunk_size=chunk_size, strategy=strategy)
    want = loop_grads(loss_fn, params, batch)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL_F32, atol=ATOL_F32), got, want
    )


@pytest.mark.parametrize("problem", ["mlp", "cnn"])
@pytest.mark.parametrize("chunk_size", [None, 3, 5])
def test_per_example_grad_norms_match_loop(problem, chunk_size):
    params, batch, loss_fn, _ = PROBLEMS[problem]()
    want = reference_grads(problem)
    want_norms = np.sqrt(
        sum(
            np.sum(np.asarray(g).reshape(g.shape[0], -1) ** 2, axis=1)
            for g in jax.tree_util.tree_leaves(want)
        )
    )
    got = grads.per_example_grad_norms(loss_fn, params, batch, chunk_size=chunk_size)
    assert got.shape == (batch["x"].shape[0],)
    np.testing.assert_allclose(got, want_norms, rtol=RTOL_F32, atol=ATOL_F32)


def test_chunked_equals_unchunked_under_jit():
    params, batch, loss_fn, _ = mlp_problem(n=23)
    f = jax.jit(lambda p, b: grads.per_example_grads(loss_fn, p, b, chunk_size=4))
    g = jax.jit(lambda p, b: grads.per_example_grads(loss_fn, p, b))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL_F32, atol=ATOL_F32),
        f(params, batch),
        g(params, batch),
    )


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 6, 50])
def test_chunked_sum_counts_every_example_once(chunk_size):
    batch = {"v": jnp.arange(23.0)}
    total = grads.chunked_sum(lambda ex: {"s": ex["v"], "n": jnp.ones(())}, batch, chunk_size)
    assert float(total["s"]) == pytest.approx(sum(range(23)))
    assert float(total["n"]) == 23


@pytest.mark.parametrize("problem", ["logistic", "cnn"])
@pytest.mark.parametrize("strategy", ["vmap", "rewrite"])
def test_mean_grad_is_mean_of_per_example_grads(problem, strategy):
    params, batch, loss_fn, _ = PROBLEMS[problem]()
    per_ex = reference_grads(problem)
    got = grads.mean_grad(loss_fn, params, batch, strategy=strategy)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, np.mean(w, axis=0), rtol=1e-5, atol=1e-6),
        got,
        per_ex,
    )


def test_empty_batch_is_rejected():
    params, batch, loss_fn, _ = logistic_problem()
    empty = jax.tree_util.tree_map(lambda a: a[:0], batch)
    with pytest.raises(ValueError, match="empty"):
        grads.per_example_grads(loss_fn, params, empty)


def test_disagreeing_batch_sizes_are_rejected():
    params, batch, loss_fn, _ = logistic_problem()
    bad = {"x": batch["x"], "y": batch["y"][:-1]}
    with pytest.raises(ValueError, match="disagree on the batch size"):
        grads.per_example_grads(loss_fn, params, bad)


def test_non_scalar_loss_is_rejected():
    params, batch, _, logits_fn = logistic_problem()
    with pytest.raises(TypeError, match="must return a scalar"):
        grads.per_example_grads(logits_fn, params, batch)


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5])
def test_bad_chunk_size_is_rejected(chunk_size):
    params, batch, loss_fn, _ = logistic_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        grads.per_example_grads(loss_fn, params, batch, chunk_size=chunk_size)


def test_unknown_strategy_is_rejected():
    params, batch, loss_fn, _ = logistic_problem()
    with pytest.raises(ValueError, match="strategy"):
        grads.per_example_grads(loss_fn, params, batch, strategy="fast")


def test_auto_strategy_rewrites_on_the_cpu_only(monkeypatch):
    assert cpu_rewrites.use_rewrite("auto") == (jax.default_backend() == "cpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not cpu_rewrites.use_rewrite("auto")
    assert cpu_rewrites.use_rewrite("rewrite") and not cpu_rewrites.use_rewrite("vmap")


# The jaxpr rewrites, one at a time: each must fire on its pattern and give the same numbers.


def _primitives(fn, *args):
    return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


def _assert_same(got, want, rtol=0.0, atol=0.0):
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol), got, want
    )


@pytest.mark.parametrize("jit_inside", [False, True])
def test_rewrite_folds_the_transpose_of_per_example_dense_weight_gradients(jit_inside):
    params, batch, loss_fn, _ = mlp_problem(n=9)
    if jit_inside:  # a jitted loss: the rewrite must look inside the jit equation
        loss_fn = jax.jit(loss_fn)
    per_example = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
    plain = _primitives(per_example, params, batch)
    if jit_inside:  # the forward and the backward pass, each a jit equation
        assert "transpose" not in plain and plain.count("jit") + plain.count("pjit") == 2
    else:
        assert plain.count("transpose") == 2  # one per weight matrix
    rewritten = _primitives(cpu_rewrites._rewritten(per_example), params, batch)
    assert "transpose" not in rewritten and "jit" not in rewritten
    got = jax.jit(cpu_rewrites._rewritten(per_example))(params, batch)
    want = jax.jit(per_example)(params, batch)
    if jit_inside:  # XLA fuses the inlined jit differently (tanh and its derivative): rounding
        _assert_same(got, want, rtol=RTOL_F32, atol=ATOL_F32)
    else:  # an outer product has no sums: the swapped dot_general gives the same bits
        _assert_same(got, want)


def test_rewrite_folds_only_transposes_that_swap_the_free_dimensions():
    a, b = jnp.arange(6.0).reshape(2, 3), jnp.arange(8.0).reshape(2, 4)

    def fn(a, b):
        outer = lax.dot_general(a, b, (((), ()), ((0,), (0,))))  # [2, 3, 4]
        other = lax.dot_general(a, b, (((), ()), ((0,), (0,))))
        return outer.transpose(0, 2, 1), other.transpose(1, 0, 2)

    prims = _primitives(cpu_rewrites._rewritten(fn), a, b)
    assert prims.count("transpose") == 1  # (1, 0, 2) moves the batch dim: not a swap
    _assert_same(cpu_rewrites._rewritten(fn)(a, b), fn(a, b))


def test_rewrite_keeps_a_dot_general_read_twice():
    a, b = jnp.arange(6.0).reshape(2, 3), jnp.arange(8.0).reshape(2, 4)

    def fn(a, b):
        outer = lax.dot_general(a, b, (((), ()), ((0,), (0,))))
        return outer.transpose(0, 2, 1), outer * 2.0

    assert _primitives(cpu_rewrites._rewritten(fn), a, b).count("dot_general") == 1
    _assert_same(cpu_rewrites._rewritten(fn)(a, b), fn(a, b))


POOLS = {
    # name: (init, op, window, strides, padding)
    "max 2x2": (-jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
    "max 2x2 odd size": (-jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME"),
    "max 3x3 stride 2": (-jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME"),
    "max 2x1 uneven": (-jnp.inf, lax.max, (1, 2, 1, 1), (1, 2, 1, 1), "VALID"),
    "min 2x2": (jnp.inf, lax.min, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
}


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("values", ["normal", "ties", "nan"])
def test_rewritten_pooling_gradient_matches_select_and_scatter_add(pool, values):
    init, op, window, strides, padding = POOLS[pool]
    rng = np.random.default_rng(0)
    if values == "normal":
        x = rng.normal(size=(2, 7, 5, 3))
    else:  # few distinct values: nearly every window holds ties
        x = rng.integers(-1, 2, size=(2, 7, 5, 3)).astype(float)
    if values == "nan":
        x[0, 1, 1, :] = np.nan
        x[1, 4, 2, 0] = -np.inf
    x = jnp.asarray(x, jnp.float32)

    def grad(x):  # cos(pool(x)) is scattered back to the chosen elements
        pooled = lambda x: lax.reduce_window(x, init, op, window, strides, padding)
        return jax.grad(lambda x: jnp.sum(jnp.sin(pooled(x))))(x)

    plain = jax.jit(grad)
    rewritten = jax.jit(cpu_rewrites._rewritten(grad))
    assert "select_and_scatter_add" in _primitives(grad, x)
    assert "select_and_scatter_add" not in _primitives(cpu_rewrites._rewritten(grad), x)
    # The same element of each window is chosen; only overlapping windows add in another order.
    tol = 1e-6 if strides != window else 0.0
    np.testing.assert_allclose(rewritten(x), plain(x), rtol=tol, atol=tol)


CONVS = {
    "NHWC/HWIO": dict(dimension_numbers=("NHWC", "HWIO", "NHWC"), window_strides=(1, 1)),
    "NCHW/OIHW strided": dict(dimension_numbers=("NCHW", "OIHW", "NCHW"), window_strides=(2, 1)),
    "dilated, grouped": dict(
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        window_strides=(1, 1),
        rhs_dilation=(2, 1),
        feature_group_count=2,
    ),
}


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_rewritten_conv_gradients_match(conv, chunk_size):
    kwargs = CONVS[conv]
    lhs_spec, rhs_spec, _ = kwargs["dimension_numbers"]
    groups = kwargs.get("feature_group_count", 1)
    rng = np.random.default_rng(1)
    shape = {"N": 7, "H": 6, "W": 5, "C": 4}
    x = jnp.asarray(rng.normal(size=[shape[c] for c in lhs_spec]), jnp.float32)
    kernel_shape = {"H": 3, "W": 2, "I": 4 // groups, "O": 6}
    w = jnp.asarray(rng.normal(size=[kernel_shape[c] for c in rhs_spec]), jnp.float32)

    def loss(w, x_one):
        out = lax.conv_general_dilated(x_one[None], w, padding="SAME", **kwargs)
        return jnp.sum(jnp.tanh(out))

    got = grads.per_example_grads(loss, w, x, chunk_size=chunk_size, strategy="rewrite")
    want = grads.per_example_grads(loss, w, x, strategy="vmap")
    # Another layout may make XLA pick another convolution kernel: summation order, whose absolute
    # error scales with the largest entries (sums of ~24 products), not with each entry.
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=RTOL_F32, atol=ATOL_F32 * scale)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 5, 64])
def test_chunked_map_handles_a_remainder_and_non_gradient_outputs(chunk_size):
    batch = {"v": jnp.arange(23.0), "m": jnp.arange(46.0).reshape(23, 2)}
    got = grads.chunked_map(lambda ex: {"a": ex["v"] * 2.0, "b": ex["m"].sum()}, batch, chunk_size)
    np.testing.assert_array_equal(got["a"], 2.0 * np.arange(23.0))
    np.testing.assert_array_equal(got["b"], np.arange(46.0).reshape(23, 2).sum(1))


@pytest.mark.parametrize("strategy", ["vmap", "rewrite"])
def test_chunked_sum_strategies_agree(strategy):
    params, batch, loss_fn, _ = cnn_problem()

    @jax.jit
    def total(p, b):
        return grads.chunked_sum(lambda ex: jax.grad(loss_fn)(p, ex), b, 5, strategy=strategy)

    got = total(params, batch)
    want = jax.tree_util.tree_map(lambda g: np.sum(g, 0), reference_grads("cnn"))
    _assert_same(got, want, rtol=RTOL_F32, atol=ATOL_F32)


def test_per_example_grads_under_jit_trace_once():
    params, batch, loss_fn, _ = cnn_problem()
    traces = []

    @jax.jit
    def step(p, b):
        traces.append(1)
        return grads.per_example_grads(loss_fn, p, b, chunk_size=5)

    first = step(params, batch)
    second = step(jax.tree_util.tree_map(lambda a: a + 1.0, params), batch)
    assert len(traces) == 1, f"retraced: {len(traces)} traces"
    assert not np.allclose(first["d"]["w"], second["d"]["w"])


def _big(problem, n):
    """``problem`` with its batch tiled to ``n`` examples (auto-chunking needs ``B >= 64``)."""
    params, batch, loss_fn, logits_fn = problem()
    reps = -(-n // batch["x"].shape[0])
    big = jax.tree_util.tree_map(lambda a: jnp.concatenate([a] * reps)[:n], batch)
    return params, big, loss_fn, logits_fn


def test_auto_chunks_when_intermediates_outweigh_the_output():
    # CNN: one example's activations and their gradients (~10 kB) outweigh its gradient (~1 kB).
    params, batch, loss_fn, _ = _big(cnn_problem, 70)
    grad_one = lambda ex: jax.grad(loss_fn)(params, ex)
    assert cpu_rewrites.auto_chunk_size(grad_one, batch, 70) == cpu_rewrites._AUTO_CHUNK
    # MLP 784-64-10: the gradient (50 kB) outweighs the activations; its norm does not.
    params, batch, loss_fn, _ = mlp_problem(n=70, d=784, hidden=64, classes=10)
    grad_one = lambda ex: jax.grad(loss_fn)(params, ex)
    assert cpu_rewrites.auto_chunk_size(grad_one, batch, 70) is None
    norm_one = lambda ex: optax.tree.norm(grad_one(ex))
    assert cpu_rewrites.auto_chunk_size(norm_one, batch, 70) == cpu_rewrites._AUTO_CHUNK
    # Too small a batch for two chunks: all at once.
    assert cpu_rewrites.auto_chunk_size(norm_one, batch, 63) is None


def test_auto_chunked_grads_match_python_loop():
    params, batch, loss_fn, _ = _big(cnn_problem, 70)  # 3 chunks, the last one overlapping
    step = jax.jit(lambda p, b: grads.per_example_grads(loss_fn, p, b))
    got = step(params, batch)
    assert "while" in step.lower(params, batch).as_text()  # it did chunk
    want = jax.tree_util.tree_map(
        lambda g: np.concatenate([g] * 6)[:70], reference_grads("cnn")
    )  # the batch is the 12-example CNN batch tiled
    _assert_same(got, want, rtol=RTOL_F32, atol=ATOL_F32)


def test_chunked_map_of_random_keys():
    keys = jax.random.split(jax.random.key(0), 70)
    batch = {"key": keys, "x": jnp.ones((70, 3))}
    # Intermediates outweigh the output, so "auto" chunks (and must size PRNG keys to decide).
    fn = lambda ex: jnp.sum(jax.random.normal(ex["key"], (50,)) * ex["x"][0])
    got = jax.jit(lambda b: grads.chunked_map(fn, b, None))(batch)
    want = jax.vmap(fn)(batch)
    np.testing.assert_allclose(got, want, rtol=RTOL_F32, atol=ATOL_F32)


def test_rewrite_passes_through_scan_checkpoint_and_custom_vjp():
    params, batch, loss_fn, _ = mlp_problem(n=9)

    @jax.custom_vjp
    def clip_grad(x):
        return x

    clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))

    @jax.checkpoint
    def step(h, w):
        return jnp.tanh(h @ w), None

    def loss(p, ex):  # the first layer applied three times by a scan, under remat
        h0 = jnp.tanh(ex["x"] @ p["l1"]["w"])
        sq = jnp.eye(h0.shape[0]) + 0.1 * jnp.outer(p["l1"]["b"], p["l1"]["b"])
        h, _ = lax.scan(step, clip_grad(h0), jnp.stack([sq] * 3))
        return loss_fn(p, ex) + jnp.sum(h**2)

    got = jax.jit(lambda p, b: grads.per_example_grads(loss, p, b, strategy="rewrite"))
    want = jax.jit(lambda p, b: grads.per_example_grads(loss, p, b, strategy="vmap"))
    _assert_same(got(params, batch), want(params, batch), rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_per_example_grads_can_be_differentiated(chunk_size):
    params, batch, loss_fn, _ = cnn_problem()

    def total_norm(p, strategy):
        norms = grads.per_example_grad_norms(
            loss_fn, p, batch, chunk_size=chunk_size, strategy=strategy
        )
        return jnp.sum(norms)

    got = jax.jit(jax.grad(total_norm), static_argnums=1)(params, "rewrite")
    want = jax.jit(jax.grad(total_norm), static_argnums=1)(params, "vmap")
    # A second derivative summed over the batch: entries of ~1 sit among entries of ~30, so the
    # absolute error of a float32 reassociation scales with the largest entry, not with each entry.
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree_util.tree_leaves(want))
    _assert_same(got, want, rtol=RTOL_F32, atol=ATOL_F32 * scale)
