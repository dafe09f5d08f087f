"""Gradient transforms: SAM against a manual two-evaluation computation, the saliency mask's kept
fraction and ranking, and masked weights that stay bit-identical under weight decay and momentum."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests._problems import loop_grads, mlp_problem
from unlearn_jax.core import reductions
from unlearn_jax.core.task import Task
from unlearn_jax.data import Dataset
from unlearn_jax.methods import objectives as O
from unlearn_jax.methods import transforms as T
from unlearn_jax.methods.driver import compute_statistics, unlearn
from unlearn_jax.methods.gradient import gradient_method

RTOL = 1e-5  # same float32 operations in a different order
ATOL = 1e-6


def tiny():
    """A 2-layer tanh MLP (plain JAX), its Task, and a forget/retain split of 20 examples."""
    params, batch, loss_fn, logits_fn = mlp_problem(n=20)
    task = Task(apply=lambda p, x: jax.vmap(lambda xi: logits_fn(p, {"x": xi}))(x))
    ids = jnp.arange(20)
    full = {"x": batch["x"], "y": batch["y"], "id": ids}
    forget = jax.tree_util.tree_map(lambda a: a[:6], full)
    retain = jax.tree_util.tree_map(lambda a: a[6:], full)
    return params, task, forget, retain, loss_fn


def context(task, forget, retain, ref=None):
    return O.Context(
        ref_params=ref,
        forget=forget,
        retain=retain,
        key=jax.random.key(0),
        task=task,
        step=jnp.zeros((), jnp.int32),
        progress=jnp.zeros((), jnp.float32),
    )


def add(a, b, scale=1.0):
    return jax.tree_util.tree_map(lambda x, y: x + scale * y, a, b)


# ---- SAM -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam_gradient_matches_manual_two_evaluations(rho):
    params, task, forget, retain, loss_fn = tiny()
    objective = -O.forget_loss() + 0.7 * O.retain_loss() + 1e-3 * O.l1_norm(decay="constant")
    ctx = context(task, forget, retain)
    sam_vg = T.sharpness_aware(rho).wrap(T.value_and_grad, None)
    (loss, metrics), got = jax.jit(lambda p: sam_vg(objective, p, ctx, {}))(params)

    # Independent reference in plain JAX: the forget loss is -mean CE over the forget examples.
    def forget_part(p):
        return -jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, forget))

    def rest(p):
        ce = jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, retain))
        return 0.7 * ce + 1e-3 * sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(p))

    @jax.jit  # one compilation instead of eager per-op dispatch
    def reference(p):
        g_f = jax.grad(forget_part)(p)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(g_f)))
        perturbed = add(p, g_f, rho / norm)
        return (
            add(jax.grad(forget_part)(perturbed), jax.grad(rest)(p)),
            norm,
            forget_part(p) + rest(p),
        )

    want, norm, want_loss = reference(params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), got, want
    )
    # the loss is reported at the UNperturbed parameters
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    np.testing.assert_allclose(metrics["sam/forget_grad_norm"], norm, rtol=RTOL)


def test_sam_without_forget_terms_is_the_plain_gradient():
    params, task, forget, retain, _ = tiny()
    objective = O.retain_loss().as_objective()
    ctx = context(task, forget, retain)
    _, plain = jax.jit(lambda p: T.value_and_grad(objective, p, ctx, {}))(params)
    sam_vg = T.sharpness_aware(0.3).wrap(T.value_and_grad, None)
    _, sam = jax.jit(lambda p: sam_vg(objective, p, ctx, {}))(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, sam, plain)


def test_sam_normalisation_is_traced_not_frozen():
    """Regression (analogue of a gradient-norm penalty made constant by a Python float conversion):
    the norm in delta = rho g / ||g|| must be a traced function of the current gradient.

    Under one jit compilation, gradients of different sizes all give ||delta|| = rho (a norm frozen at
    trace time would not), and the norm is differentiable w.r.t. the parameters (non-zero gradient).
    """
    perturb = jax.jit(T.sam_perturbation)
    tree = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}
    for scale in (1.0, 1e-3, 250.0):
        g = jax.tree_util.tree_map(lambda x, s=scale: s * x, tree)
        delta, norm = perturb(g, 0.1)
        np.testing.assert_allclose(norm, 13.0 * scale, rtol=RTOL)
        got = np.sqrt(sum(np.sum(np.square(d)) for d in jax.tree_util.tree_leaves(delta)))
        np.testing.assert_allclose(got, 0.1, rtol=RTOL)
    # zero gradient: no perturbation, no NaN
    delta, norm = perturb(jax.tree_util.tree_map(jnp.zeros_like, tree), 0.1)
    assert float(norm) == 0.0 and all(np.all(d == 0) for d in jax.tree_util.tree_leaves(delta))

    params, task, forget, retain, _ = tiny()
    ctx = context(task, forget, retain)
    forget_part = (-O.forget_loss()).as_objective()

    def grad_norm(p):
        _, g = T.value_and_grad(forget_part, p, ctx, {})
        return T.sam_perturbation(g, 0.1)[1]

    d_norm = jax.jit(jax.grad(grad_norm))(params)
    assert sum(float(jnp.sum(jnp.abs(a))) for a in jax.tree_util.tree_leaves(d_norm)) > 1e-3


def test_negative_rho_raises():
    with pytest.raises(ValueError, match="rho"):
        T.sharpness_aware(-0.01)


# ---- saliency mask -------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 1.0])
def test_top_fraction_mask_keeps_exactly_k_ranked_globally(fraction):
    rng = np.random.default_rng(0)
    scores = {"w": jnp.asarray(rng.random((10, 7))), "b": jnp.asarray(rng.random(30))}
    mask = T.top_fraction_mask(scores, fraction)
    flat_scores = np.concatenate([np.ravel(scores["b"]), np.ravel(scores["w"])])
    flat_mask = np.concatenate([np.ravel(mask["b"]), np.ravel(mask["w"])])
    k = max(1, round(fraction * 100))
    assert flat_mask.sum() == k
    assert flat_scores[flat_mask].min() >= flat_scores[~flat_mask].max(initial=-np.inf)


def test_top_fraction_mask_ranks_across_tensors_not_within():
    scores = {"small": jnp.full((50,), 0.1), "large": jnp.full((50,), 5.0) + jnp.arange(50) * 1e-3}
    mask = T.top_fraction_mask(scores, 0.5)
    assert bool(jnp.all(mask["large"])) and not bool(jnp.any(mask["small"]))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_mask_fraction_outside_0_1_raises(fraction):
    with pytest.raises(ValueError, match="fraction"):
        T.saliency_mask(fraction)


def test_saliency_mask_is_the_top_k_of_the_summed_forget_gradient():
    params, task, forget, _, loss_fn = tiny()
    ds = Dataset(
        x=np.asarray(forget["x"]), y=np.asarray(forget["y"]), ids=np.arange(6), num_classes=3
    )
    saliency = T.saliency_mask(0.25, batch_size=4)
    carrier = gradient_method(O.forget_loss(), optax.sgd(0.1), transform=saliency)
    stats = compute_statistics(carrier, task, params, ds, None, batch_size=4, key=jax.random.key(0))
    state = saliency.init(params, jax.random.key(0), stats)
    summed = jax.jit(
        lambda p: jax.tree_util.tree_map(
            lambda g: jnp.abs(jnp.sum(g, axis=0)), loop_grads(loss_fn, p, forget)
        )
    )(params)
    flat = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(summed)])
    got = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(state.mask)])
    k = round(0.25 * flat.size)
    np.testing.assert_array_equal(np.sort(np.flatnonzero(got)), np.sort(np.argsort(-flat)[:k]))
    np.testing.assert_allclose(state.kept_fraction, k / flat.size, rtol=RTOL)


def _dataset(batch, offset=0):
    return Dataset(
        x=np.asarray(batch["x"]),
        y=np.asarray(batch["y"]),
        ids=np.arange(len(batch["y"])) + offset,
        num_classes=3,
    )


def _bits(tree):
    return [np.asarray(a).view(np.uint32) for a in jax.tree_util.tree_leaves(tree)]


def test_masked_weights_stay_bit_identical_with_weight_decay_and_momentum():
    """Regression: SalUn's reference code masked only the gradient, so weight decay (and momentum
    carrying decayed weights) still moved the masked-out weights."""
    params, task, forget, retain, _ = tiny()
    from flax.training.train_state import TrainState

    state = TrainState.create(apply_fn=None, params=params, tx=optax.identity())
    optimizer = optax.chain(optax.add_decayed_weights(5e-2), optax.sgd(0.1, momentum=0.9))
    objective = -O.forget_loss() + O.retain_loss()
    forget_ds, retain_ds = _dataset(forget), _dataset(retain, 100)
    method = gradient_method(objective, optimizer, transform=T.saliency_mask(0.3))
    result = unlearn(
        method, state, task, forget_ds, retain_ds, key=jax.random.key(1), steps=15, batch_size=4
    )
    mask = result.method_state.transform_state.mask
    for before, after, m in zip(
        _bits(params), _bits(result.state.params), jax.tree_util.tree_leaves(mask), strict=True
    ):
        m = np.asarray(m)
        np.testing.assert_array_equal(after[~m], before[~m])  # bit for bit
        assert np.all(after[m] != before[m])  # the kept weights did move
    assert 0.25 < float(result.method_state.transform_state.kept_fraction) <= 0.3 + 1e-6

    # Control: masking only the gradient (the reference code's way) lets weight decay move them.
    def gradient_only(fraction):
        full = T.saliency_mask(fraction)
        return full._replace(update_mask=None)

    control = gradient_method(objective, optimizer, transform=gradient_only(0.3))
    moved = unlearn(
        control, state, task, forget_ds, retain_ds, key=jax.random.key(1), steps=15, batch_size=4
    )
    off = ~np.concatenate([np.ravel(m) for m in jax.tree_util.tree_leaves(mask)])
    before = np.concatenate([np.ravel(a) for a in _bits(params)])
    after = np.concatenate([np.ravel(a) for a in _bits(moved.state.params)])
    assert np.mean(after[off] != before[off]) > 0.9


def test_masked_weights_stay_bit_identical_with_adam_and_sam():
    params, task, forget, retain, _ = tiny()
    from flax.training.train_state import TrainState

    state = TrainState.create(apply_fn=None, params=params, tx=optax.identity())
    method = gradient_method(
        O.npo(beta=0.1) + O.retain_loss(),
        optax.adamw(1e-2, weight_decay=0.1),
        transform=T.chain(T.sharpness_aware(0.05), T.saliency_mask(0.5)),
    )
    result = unlearn(
        method,
        state,
        task,
        _dataset(forget),
        _dataset(retain, 100),
        key=jax.random.key(2),
        steps=5,
        batch_size=4,
    )
    mask = result.method_state.transform_state[1].mask
    for before, after, m in zip(
        _bits(params), _bits(result.state.params), jax.tree_util.tree_leaves(mask), strict=True
    ):
        np.testing.assert_array_equal(after[~np.asarray(m)], before[~np.asarray(m)])


def test_kth_largest_is_exact_across_leaves_and_scales():
    rng = np.random.default_rng(1)
    scores = {"a": jnp.asarray(rng.random((6, 5)), jnp.float32),
              "b": jnp.asarray(rng.random(17) * 1e-30, jnp.float32)}  # fmt: skip
    flat = np.sort(np.concatenate([np.ravel(v) for v in scores.values()]))[::-1]
    kth = jax.jit(T.kth_largest, static_argnums=1)
    for k in (1, 2, 30, 31, 47):  # k = 31 falls among the tiny entries
        assert float(kth(scores, k)) == flat[k - 1]


def test_zero_scores_are_never_salient():
    scores = {"w": jnp.asarray([0.0, 0.0, 0.0, 2.0, 1.0])}
    mask = T.top_fraction_mask(scores, 0.8)  # k = 4, but only two weights have a gradient
    np.testing.assert_array_equal(mask["w"], [False, False, False, True, True])


def test_an_optax_transform_inside_a_gradient_method_acts_exactly_as_optax_says():
    """optax.clip_by_global_norm in the chain: the applied update is -lr * clip(g), g the plain
    gradient of the objective at the current parameters, step after step."""
    params, task, forget, retain, _ = tiny()
    from flax.training.train_state import TrainState

    state = TrainState.create(apply_fn=None, params=params, tx=optax.identity())
    objective = -O.forget_loss() + O.retain_loss()
    lr, max_norm = 0.05, 0.1
    method = gradient_method(
        objective, optax.sgd(lr), transform=optax.clip_by_global_norm(max_norm)
    )
    forget_ds, retain_ds = _dataset(forget), _dataset(retain, 100)
    result = unlearn(
        method, state, task, forget_ds, retain_ds, key=jax.random.key(4), steps=3, batch_size=64
    )
    # The whole sets fit in one batch: each step's gradient is the full objective's.
    ref, batch_f, batch_r = params, forget, retain
    for _ in range(3):
        ctx = context(task, batch_f, batch_r)
        _, g = T.value_and_grad(objective, ref, ctx, {})
        clip = optax.clip_by_global_norm(max_norm)
        clipped, _ = clip.update(g, clip.init(ref), ref)
        ref = jax.tree_util.tree_map(lambda p, c: p - lr * c, ref, clipped)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        result.state.params,
        ref,
    )
    np.testing.assert_allclose(result.metrics["grad_norm"], max_norm, rtol=1e-5)


def test_chain_composes_wraps_updates_masks_and_statistics():
    t = T.chain(T.sharpness_aware(0.01), T.saliency_mask(0.5), optax.clip_by_global_norm(1.0))
    assert t.name == "chain(sam, saliency_mask, optax)"
    assert set(t.statistics) == {"1/forget_gradient"}
    assert t.wrap is not None and t.update is not None and t.update_mask is not None
    with pytest.raises(TypeError, match="GradientTransform"):
        T.chain("clip")


def test_saliency_statistic_is_the_streaming_gradient_sum():
    params, task, forget, _, loss_fn = tiny()
    ds = _dataset(forget)
    out = reductions.reduce(reductions.gradient_sum(task.loss), params,
                            [ds.take(np.arange(4)).as_batch(), ds.take([4, 5]).as_batch()])  # fmt: skip
    want = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), loop_grads(loss_fn, params, forget))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out.value, want
    )
    assert float(out.count) == 6
