"""The transformer LM against a float64 numpy transcription, RoPE's rotation and relative-position
property, causality, tied embeddings, scan/remat equivalences, the sequence loss, and its errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unlearn_jax.models import (
    LANGUAGE_MODELS,
    TransformerLM,
    get_model,
    model_config,
    model_task,
)
from unlearn_jax.models import transformer as tf
from unlearn_jax.training import create_train_state

# float32 forward passes compared with float64 numpy references of the same maths.
RTOL_F32 = 1e-4
ATOL_F32 = 1e-5
V, D, H, F, L, T, B = 32, 32, 4, 64, 2, 8, 2
KEY = jax.random.key(0)
# XLA:CPU compilation dominates these tests (seconds per program on a loaded 2-core machine);
# LLVM's optimisation level 0 compiles 2-3x faster and changes no value beyond float rounding.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _tiny(**kwargs):
    base = dict(num_outputs=V, d_model=D, num_layers=L, num_heads=H, mlp_dim=F, max_len=16)
    return TransformerLM(**{**base, **kwargs})


def _tokens(b=B, t=T, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(b, t)).astype(np.int32)


def _init(model, x, seed=0):
    """Random N(0, 0.3^2) leaves (norm scales 1 + N(0, 0.1^2)) with the model's unboxed tree.

    Only the structure comes from ``model.init`` (traced, never compiled), which keeps these tests
    free of initialiser compilations; the values are rich enough that a wrong norm scale or a
    missing rotation shows.
    """
    shapes = nn.unbox(jax.eval_shape(model.init, KEY, x))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return (1 + 0.1 * rng.normal(size=s.shape)).astype(s.dtype)
        return (0.3 * rng.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _bundle(model, layers=None):
    """One compiled program per model: logits, features and the hidden states ``h_k``, ``k`` in
    ``layers`` (default every one, ``0 .. L``).

    Compilation dominates these tests on a CPU, so every check on a configuration shares it.
    """
    layers = range(model.num_layers + 1) if layers is None else layers

    def run(params, x):
        variables = {"params": params}
        out = {
            "logits": model.apply(variables, x),
            "features": model.apply(variables, x, method=TransformerLM.features),
        }
        for k in layers:
            out[f"h{k}"] = model.apply(variables, x, k, method=TransformerLM.hidden_states)
        return out

    return jit(run)


# ---- a float64 numpy transcription of the forward pass -----------------------------------------
def _np_norm(x, p, kind):
    if kind == "rmsnorm":
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * p["scale"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _np_rope(x, positions, base=10_000.0):
    """Rotates each pair (i, i + Dh/2) by positions * base^(-2i/Dh) with explicit 2x2 matrices."""
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            angle = pos * base ** (-2.0 * i / x.shape[-1])
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            pair = np.stack([x[:, t, :, i], x[:, t, :, i + half]], -1)  # [B, H, 2]
            rotated = pair @ rot.T
            out[:, t, :, i], out[:, t, :, i + half] = rotated[..., 0], rotated[..., 1]
    return out


def _np_gelu(x):  # flax's default: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_forward(params, x, norm="rmsnorm", mlp="gelu"):
    """``(logits, features, [h_0 .. h_L])`` in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    emb = p["embed"]["embedding"]
    h = emb[x] * np.sqrt(D)
    hidden = [h]
    t = x.shape[1]
    for i in range(L):
        lp = p[f"layers_{i}"]
        a = _np_norm(h, lp["attn_norm"], norm)
        q, k, v = (
            np.einsum("btd,dhk->bthk", a, lp["attn"][n]["kernel"])
            for n in ("query", "key", "value")
        )
        q, k = _np_rope(q, np.arange(t)), _np_rope(k, np.arange(t))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        mixed = np.einsum("bhqk,bkhd->bqhd", probs, v)
        h = h + np.einsum("bqhd,hde->bqe", mixed, lp["attn"]["out"]["kernel"])
        m = _np_norm(h, lp["mlp_norm"], norm)
        if mlp == "gelu":
            inner = _np_gelu(m @ lp["mlp"]["wi"]["kernel"])
        else:
            gate = m @ lp["mlp"]["wi_gate"]["kernel"]
            inner = gate / (1 + np.exp(-gate)) * (m @ lp["mlp"]["wi_up"]["kernel"])
        h = h + inner @ lp["mlp"]["wo"]["kernel"]
        hidden.append(h)
    feats = _np_norm(h, p["final_norm"], norm)
    return feats @ emb.T, feats, hidden


# ---- forward pass, shapes, registry --------------------------------------------------------------
@pytest.mark.parametrize(("norm", "mlp"), [("rmsnorm", "gelu"), ("layernorm", "swiglu")])
def test_forward_pass_matches_a_float64_numpy_transcription(norm, mlp):
    model = _tiny(norm=norm, mlp=mlp)
    x = _tokens()
    p = _init(model, x)
    want_logits, want_feats, want_hidden = _np_forward(p, x, norm, mlp)
    out = _bundle(model)(p, x)
    assert out["logits"].shape == (B, T, V) and out["logits"].dtype == jnp.float32
    assert out["features"].shape == (B, T, D)
    np.testing.assert_allclose(out["logits"], want_logits, rtol=RTOL_F32, atol=ATOL_F32)
    np.testing.assert_allclose(out["features"], want_feats, rtol=RTOL_F32, atol=ATOL_F32)
    # hidden_states(x, k) is the residual stream after k blocks (k = 0: the scaled embedding).
    for k in range(L + 1):
        np.testing.assert_allclose(out[f"h{k}"], want_hidden[k], rtol=RTOL_F32, atol=ATOL_F32)


def test_output_projection_is_the_transposed_input_embedding():
    model = _tiny()
    x = _tokens()
    p = _init(model, x)
    assert set(p) == {"embed", "final_norm", *(f"layers_{i}" for i in range(L))}  # no head
    out = _bundle(model)(p, x)
    want = np.asarray(out["features"], np.float64) @ np.asarray(p["embed"]["embedding"]).T
    np.testing.assert_allclose(out["logits"], want, rtol=RTOL_F32, atol=ATOL_F32)


def test_changing_a_token_changes_no_logit_before_it():
    model = _tiny()
    x = _tokens()
    p = _init(model, x)
    t = 5
    y = x.copy()
    y[:, t] = (y[:, t] + 1) % V
    a, b = np.asarray(_bundle(model)(p, x)["logits"]), np.asarray(_bundle(model)(p, y)["logits"])
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.all(np.abs(a[:, t:] - b[:, t:]).max(axis=-1) > 1e-4)


@pytest.mark.parametrize("name", sorted(LANGUAGE_MODELS))
def test_registered_configurations_count_their_parameters(name):
    model = get_model(name, num_outputs=32_000)
    x = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, KEY, x))["params"]
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count == tf.num_params(model)
    low, high = {"lm-tiny": (4e5, 5e6), "lm-100m": (1e8, 1.3e8), "lm-1b": (0.9e9, 1.1e9)}.get(
        name, (0, np.inf)
    )
    assert low <= count <= high, (name, count)
    config = model_config(model)
    assert config["name"] == name and get_model(**config) == model


def test_tiny_configuration_has_a_few_hundred_thousand_parameters_at_small_vocabularies():
    assert 3e5 < tf.num_params(get_model("lm-tiny", num_outputs=128)) < 1e6


# ---- RoPE --------------------------------------------------------------------------------------
def test_rope_is_the_pairwise_rotation_by_position_times_frequency():
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([0, 1, 2, 7, 100])
    got = jit(tf.rope)(x, positions)
    np.testing.assert_allclose(got, _np_rope(x.astype(np.float64), positions), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_positions():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
    k = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
    positions = np.array([0, 3, 4, 9, 10, 20])

    rope = jit(tf.rope)  # one compilation for every shift

    def scores(shift):
        rq, rk = rope(q, positions + shift), rope(k, positions + shift)
        return np.asarray(jnp.einsum("bqhd,bkhd->bhqk", rq, rk))

    base = scores(0)
    np.testing.assert_allclose(scores(37), base, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores(1000), base, rtol=1e-3, atol=1e-3)  # float32 angles
    # ... and they do depend on the positions: the unrotated scores differ.
    assert np.abs(np.einsum("bqhd,bkhd->bhqk", q, k) - base).max() > 0.1


def test_rope_rejects_odd_head_dimensions_and_mismatched_positions():
    with pytest.raises(ValueError, match="even head dimension"):
        tf.rope(jnp.zeros((1, 2, 1, 3)), jnp.arange(2))
    with pytest.raises(ValueError, match=r"positions must have shape \[T\]"):
        tf.rope(jnp.zeros((1, 2, 1, 4)), jnp.arange(3))


# ---- scan and remat ----------------------------------------------------------------------------
def test_scanned_layers_compute_the_same_function_as_unrolled_ones():
    unrolled, scanned = _tiny(), _tiny(scan_layers=True)
    x = _tokens()
    p = _init(unrolled, x)
    ps = tf.stack_layers(p, L)
    scanned_shapes = nn.unbox(jax.eval_shape(scanned.init, KEY, x))["params"]
    assert jax.tree.map(np.shape, ps) == jax.tree.map(lambda s: s.shape, scanned_shapes)
    # Under scan every hidden_states call runs the whole scan: one middle layer keeps it cheap.
    got, want = _bundle(scanned, (1,))(ps, x), _bundle(unrolled)(p, x)
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL_F32, atol=ATOL_F32, err_msg=key)


def test_remat_gives_the_same_outputs_and_gradients():
    # The scanned configuration (that of lm-100m and lm-1b); one compiled program for both.
    plain, remat = _tiny(scan_layers=True), _tiny(scan_layers=True, remat=True)
    x, y = _tokens(), _tokens(seed=1)
    p = tf.stack_layers(_init(_tiny(), x), L)

    @jit
    def both(q):
        grad = lambda m: jax.value_and_grad(model_task(m).batch_loss)(q, {"x": x, "y": y})
        return grad(plain), grad(remat)

    (l0, g0), (l1, g1) = both(p)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- the sequence task ---------------------------------------------------------------------------
def test_per_example_loss_is_the_weighted_token_negative_log_likelihood():
    model = get_model("transformer", num_outputs=V, d_model=D, num_layers=L, num_heads=H, mlp_dim=F)
    assert model == _tiny(max_len=128)
    task = model_task(model)
    assert task.kind == "sequence"
    x = _tokens()
    p = _init(model, x)
    y = _tokens(seed=2)
    w = np.random.default_rng(3).integers(0, 2, size=(B, T)).astype(np.float32)
    logits, _, _ = _np_forward(p, x)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]  # [B, T]
    # The single-example loss (what per-example gradients differentiate), vmapped over the batch.
    got = jit(jax.vmap(task.loss, in_axes=(None, 0)))(p, {"x": x, "y": y, "weights": w})
    np.testing.assert_allclose(got, np.sum(w * nll, axis=1), rtol=1e-5)


def test_create_train_state_holds_plain_arrays():
    # Traced only (no compilation): the structure is what matters.
    model = _tiny()
    state = jax.eval_shape(
        lambda k: create_train_state(model, _tokens(b=1), optax.adam(1e-3), k), KEY
    )
    leaves = jax.tree.leaves(
        (state.params, state.opt_state), is_leaf=lambda a: isinstance(a, nn.Partitioned)
    )
    assert leaves and all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)
    assert state.params["layers_0"]["mlp"]["wi"]["kernel"].shape == (D, F)


def test_init_annotates_every_parameter_with_logical_axis_names():
    variables = jax.eval_shape(_tiny(scan_layers=True).init, KEY, _tokens())
    boxes = jax.tree.leaves(variables, is_leaf=lambda a: isinstance(a, nn.Partitioned))
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["layers"]["attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(specs["layers"]["mlp"]["wo"]["kernel"]) == ("layers", "mlp", "embed")


# ---- errors ------------------------------------------------------------------------------------
def test_bad_inputs_and_configurations_get_clear_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"integer token ids of shape \[B, T\].*float32"):
        jax.eval_shape(model.init, KEY, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"integer token ids of shape \[B, T\].*\(4,\)"):
        jax.eval_shape(model.init, KEY, np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_len=16"):
        jax.eval_shape(model.init, KEY, np.zeros((1, 17), np.int32))
    with pytest.raises(ValueError, match="num_heads=3 must divide d_model=32"):
        jax.eval_shape(_tiny(num_heads=3).init, KEY, _tokens())
    with pytest.raises(ValueError, match="must be even for RoPE"):
        jax.eval_shape(_tiny(head_dim=5).init, KEY, _tokens())
    with pytest.raises(ValueError, match="unknown mlp 'relu'"):
        jax.eval_shape(_tiny(mlp="relu").init, KEY, _tokens())
    p = _init(model, _tokens())
    with pytest.raises(ValueError, match=r"layer=3 must lie in \[0, num_layers=2\]"):
        jax.eval_shape(
            lambda q: model.apply({"params": q}, _tokens(), 3, method=TransformerLM.hidden_states),
            p,
        )
    with pytest.raises(ValueError, match="no hyper-parameter"):
        get_model("lm-tiny", num_outputs=V, vocab_size=V)
