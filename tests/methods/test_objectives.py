"""Objective terms against values computed by hand (numpy) on tiny logits.

The "model" here is a table of logits: ``params = {"z": [N, K]}`` and the input of example ``i`` is
its row index, so ``outputs = z[x]`` and every loss has a closed form in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.core.task import Task
from unlearn_jax.methods import objectives as O

RTOL = 1e-5  # float32 log-softmax / log-sigmoid against float64 numpy
ATOL = 1e-6

TABLE = Task(apply=lambda p, x: p["z"][x])

Z = np.array(
    [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]], dtype=np.float32
)
Z_REF = np.array(
    [[1.0, 1.0, 0.0], [0.5, -0.5, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]], dtype=np.float32
)
FORGET = {"x": jnp.array([0, 1]), "y": jnp.array([0, 2]), "id": jnp.array([10, 11])}
RETAIN = {"x": jnp.array([2, 3]), "y": jnp.array([1, 0]), "id": jnp.array([12, 13])}


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    return (
        z
        - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True))
        - z.max(-1, keepdims=True)
    )


def np_log_sigmoid(t):
    return -np.log1p(np.exp(-np.asarray(t, np.float64)))


def log_lik(z, batch):
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
    return np_log_softmax(z[x])[np.arange(len(x)), y]


def ctx(step=0, progress=0.0, key=0, ref=Z_REF, forget=FORGET, retain=RETAIN):
    return O.Context(
        ref_params={"z": jnp.asarray(ref)},
        forget=forget,
        retain=retain,
        key=jax.random.key(key),
        task=TABLE,
        step=jnp.asarray(step, jnp.int32),
        progress=jnp.asarray(progress, jnp.float32),
    )


def value(objective, params=None, context=None, states=None):
    objective = objective.as_objective() if isinstance(objective, O.Term) else objective
    params = {"z": jnp.asarray(Z)} if params is None else params
    context = ctx() if context is None else context
    if states is None:
        states = objective.init(TABLE, params, jax.random.key(42))
    return objective.value(params, context, states)


# ---- task losses ---------------------------------------------------------------------------------
def test_retain_and_forget_loss_are_mean_cross_entropy():
    want_r = -np.mean(log_lik(Z, RETAIN))
    want_f = -np.mean(log_lik(Z, FORGET))
    loss, metrics = value(O.retain_loss())
    np.testing.assert_allclose(loss, want_r, rtol=RTOL)
    np.testing.assert_allclose(metrics["retain/loss"], want_r, rtol=RTOL)
    np.testing.assert_allclose(value(O.forget_loss())[0], want_f, rtol=RTOL)
    assert O.retain_ce is O.retain_loss


def test_grad_diff_objective_reads_as_the_paper():
    objective = -O.forget_loss() + 2.0 * O.retain_loss()
    loss, metrics = value(objective)
    want = np.mean(log_lik(Z, FORGET)) - 2.0 * np.mean(log_lik(Z, RETAIN))
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    # Metrics are the UNweighted term values (the forget loss is logged positive).
    np.testing.assert_allclose(metrics["forget/loss"], -np.mean(log_lik(Z, FORGET)), rtol=RTOL)
    assert [w for w, _ in objective.terms] == [-1.0, 2.0]


# ---- NPO / SimNPO --------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_matches_hand_computation(beta):
    lp, lp_ref = log_lik(Z, FORGET), log_lik(Z_REF, FORGET)
    want = -(2.0 / beta) * np.mean(np_log_sigmoid(-beta * (lp - lp_ref)))
    loss, metrics = value(O.npo(beta=beta))
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(metrics["forget/npo"], want, rtol=RTOL)


def test_npo_loss_formula_on_given_log_likelihoods():
    # log sigma(-0.1 * (-2 - -1)) = log sigma(0.1); log sigma(-0.1 * (0 - -3)) = log sigma(-0.3)
    got = O.npo_loss(jnp.array([-2.0, 0.0]), jnp.array([-1.0, -3.0]), 0.1)
    want = -(2 / 0.1) * 0.5 * (np_log_sigmoid(0.1) + np_log_sigmoid(-0.3))
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_npo_at_reference_is_2_log2_over_beta_with_the_gradient_of_ascent():
    beta = 0.1
    params = {"z": jnp.asarray(Z)}
    c = ctx(ref=Z)
    objective = O.npo(beta=beta).as_objective()
    np.testing.assert_allclose(value(objective, params, c)[0], 2 / beta * np.log(2), rtol=RTOL)
    g_npo = jax.grad(lambda p: objective.value(p, c, {})[0])(params)["z"]
    # d/dtheta of mean log pi (the negated forget loss): NPO's weight is 2 sigma(0) = 1 at theta_ref.
    g_ga = jax.grad(lambda p: -TABLE.batch_loss(p, FORGET))(params)["z"]
    np.testing.assert_allclose(g_npo, g_ga, rtol=RTOL, atol=ATOL)


def test_npo_uses_log_likelihoods_not_raw_logits():
    """Regression: a reference implementation applied NPO to raw logits instead of log pi(y|x).

    Adding a constant to all logits of an example leaves the softmax, hence log pi(y|x) and NPO,
    unchanged; the raw label logit z_y moves with it, so a raw-logit NPO would change.
    """
    shift = np.array([[5.0], [-3.0], [0.0], [0.0]], np.float32)
    z_shifted = Z + shift
    loss = value(O.npo(beta=0.5))[0]
    loss_shifted = value(O.npo(beta=0.5), params={"z": jnp.asarray(z_shifted)})[0]
    np.testing.assert_allclose(loss_shifted, loss, rtol=RTOL)

    def raw_logit_npo(z):
        x, y = np.asarray(FORGET["x"]), np.asarray(FORGET["y"])
        raw, raw_ref = z[x, y], Z_REF[x, y]
        return -(2 / 0.5) * np.mean(np_log_sigmoid(-0.5 * (raw - raw_ref)))

    assert abs(raw_logit_npo(z_shifted) - raw_logit_npo(Z)) > 0.1  # the defect would show


@pytest.mark.parametrize(("beta", "gamma"), [(2.5, 0.0), (4.5, 0.0), (2.5, 0.5)])
def test_simnpo_matches_hand_computation(beta, gamma):
    lp = log_lik(Z, FORGET)
    want = -(2.0 / beta) * np.mean(np_log_sigmoid(-beta * lp - gamma))
    loss, metrics = value(O.simnpo(beta=beta, gamma=gamma))
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(metrics["forget/simnpo"], want, rtol=RTOL)


def test_simnpo_normalises_by_length():
    lp, lengths = np.array([-6.0, -1.0]), np.array([3.0, 1.0])
    got = O.simnpo_loss(jnp.asarray(lp, jnp.float32), jnp.asarray(lengths, jnp.float32), 2.5, 0.25)
    want = -(2 / 2.5) * np.mean(np_log_sigmoid(-(2.5 / lengths) * lp - 0.25))
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_npo_accepts_a_sequence_log_likelihood():
    """An LM passes summed token log-likelihoods and token counts; the term only sees those."""

    def fake_sequence_ll(task, params, batch):
        del task
        per_token = jax.nn.log_softmax(params["z"][batch["x"]])  # pretend: 3 tokens, [B, 3]
        return jnp.sum(per_token, axis=-1), jnp.full(batch["x"].shape, 3.0)

    got = value(O.simnpo(beta=2.5, log_likelihood=fake_sequence_ll))[0]
    lp = np.sum(np_log_softmax(Z[np.asarray(FORGET["x"])]), axis=-1)
    want = -(2 / 2.5) * np.mean(np_log_sigmoid(-(2.5 / 3.0) * lp))
    np.testing.assert_allclose(got, want, rtol=RTOL)


# ---- random labels -------------------------------------------------------------------------------
def test_random_labels_are_wrong_fixed_per_example_and_cover_all_wrong_classes():
    n, k = 600, 5
    labels = jnp.asarray(np.arange(n) % k)
    ids = jnp.arange(1000, 1000 + n)
    key = jax.random.key(3)
    wrong = np.asarray(O._wrong_labels(key, labels, ids, k))
    assert np.all(wrong != np.asarray(labels))
    assert np.all((wrong >= 0) & (wrong < k))
    for c in range(k):  # each class's wrong labels are spread over the K-1 others
        counts = np.bincount(wrong[np.asarray(labels) == c], minlength=k)
        assert counts[c] == 0 and np.all(np.delete(counts, c) > 10)
    # the same id gets the same label whatever batch it comes in
    again = np.asarray(O._wrong_labels(key, labels[::-1], ids[::-1], k))
    np.testing.assert_array_equal(again, wrong[::-1])


def test_random_labels_term_is_cross_entropy_against_the_drawn_labels():
    term = O.random_labels()
    objective = term.as_objective()
    states = objective.init(TABLE, {"z": jnp.asarray(Z)}, jax.random.key(5))
    label_key = states["forget/random_labels"]
    wrong = np.asarray(O._wrong_labels(label_key, FORGET["y"], FORGET["id"], 3))
    want = -np.mean(np_log_softmax(Z[[0, 1]])[[0, 1], wrong])
    got_step0 = value(objective, context=ctx(key=0), states=states)[0]
    got_step9 = value(objective, context=ctx(key=9), states=states)[0]
    np.testing.assert_allclose(got_step0, want, rtol=RTOL)
    np.testing.assert_allclose(got_step9, want, rtol=RTOL)  # fixed: the step key does not matter


def test_random_labels_redrawn_each_step_when_not_fixed():
    i = jnp.arange(64)
    batch = {"x": i % 4, "y": i % 3, "id": i}
    objective = O.random_labels(fixed=False).as_objective()
    assert objective.init(TABLE, {"z": jnp.asarray(Z)}, jax.random.key(0)) == {}
    a = value(objective, context=ctx(key=1, forget=batch))[0]
    b = value(objective, context=ctx(key=2, forget=batch))[0]
    assert abs(float(a) - float(b)) > 1e-3


# ---- distillation --------------------------------------------------------------------------------
def np_kl(teacher, student, t):
    lt, ls = np_log_softmax(teacher / t), np_log_softmax(student / t)
    return t**2 * np.sum(np.exp(lt) * (lt - ls), axis=-1)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_retain_and_forget_kl_to_the_original(temperature):
    loss_r = value(O.retain_kl(temperature))[0]
    x_r = np.asarray(RETAIN["x"])
    np.testing.assert_allclose(loss_r, np.mean(np_kl(Z_REF[x_r], Z[x_r], temperature)), rtol=RTOL)
    x_f = np.asarray(FORGET["x"])
    loss_f = value(-O.forget_kl(temperature))[0]
    np.testing.assert_allclose(loss_f, -np.mean(np_kl(Z_REF[x_f], Z[x_f], temperature)), rtol=RTOL)
    # zero when the student is the teacher
    np.testing.assert_allclose(
        value(O.retain_kl(temperature), context=ctx(ref=Z))[0], 0.0, atol=ATOL
    )


def test_forget_kl_to_a_random_teacher_uses_reinitialised_params():
    teacher_init = lambda key: {"z": jax.random.normal(key, Z.shape)}
    objective = O.forget_kl(teacher="random", teacher_init=teacher_init).as_objective()
    states = objective.init(TABLE, {"z": jnp.asarray(Z)}, jax.random.key(0))
    teacher = np.asarray(states["forget/kl_random_teacher"]["z"])
    x_f = np.asarray(FORGET["x"])
    got = value(objective, states=states)[0]
    np.testing.assert_allclose(got, np.mean(np_kl(teacher[x_f], Z[x_f], 1.0)), rtol=RTOL)
    assert not np.allclose(teacher, Z_REF)


def test_reinit_params_keeps_shapes_and_follows_flax_defaults():
    params = {
        "dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)},
        "norm": {"scale": jnp.zeros(32), "bias": jnp.ones(32)},
    }
    new = O.reinit_params(params, jax.random.key(0))
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    k = np.asarray(new["dense"]["kernel"])
    assert k.shape == (64, 32) and abs(k.std() - np.sqrt(1 / 64)) < 0.03  # LeCun normal, fan-in 64
    np.testing.assert_array_equal(new["dense"]["bias"], 0.0)
    np.testing.assert_array_equal(new["norm"]["scale"], 1.0)
    again = O.reinit_params(params, jax.random.key(0))
    np.testing.assert_array_equal(again["dense"]["kernel"], k)


# ---- l1 ------------------------------------------------------------------------------------------
def test_l1_norm_value_schedule_and_gradient():
    params = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([[0.5, -0.25]])}}
    objective = 0.1 * O.l1_norm(decay="linear")
    loss, metrics = value(objective, params=params, context=ctx(progress=0.25))
    np.testing.assert_allclose(metrics["params/l1"], 3.75, rtol=RTOL)  # the raw norm is logged
    np.testing.assert_allclose(loss, 0.1 * 0.75 * 3.75, rtol=RTOL)
    g = jax.grad(lambda p: objective.value(p, ctx(progress=0.25), {})[0])(params)
    np.testing.assert_allclose(g["a"], 0.075 * np.array([1.0, -1.0]), rtol=RTOL)
    constant = 0.1 * O.l1_norm(decay="constant")
    np.testing.assert_allclose(value(constant, params, ctx(progress=0.9))[0], 0.375, rtol=RTOL)


# ---- composition ---------------------------------------------------------------------------------
def test_objective_algebra_and_labels():
    objective = O.npo(beta=0.1) + 1.0 * O.retain_loss()
    assert repr(objective) == "Objective(1.0 * npo(beta=0.1) + 1.0 * retain_loss())"
    assert objective.sides == {"forget", "retain"}
    assert objective.uses_reference
    summed = sum([O.retain_loss(), 0.5 * O.retain_loss(), O.forget_loss()])
    assert summed.labels == ("retain/loss", "retain/loss#2", "forget/loss")
    np.testing.assert_allclose(
        value(summed)[0],
        -1.5 * np.mean(log_lik(Z, RETAIN)) - np.mean(log_lik(Z, FORGET)),
        rtol=RTOL,
    )
    assert (O.retain_loss() - O.forget_loss()).terms[1][0] == -1.0
    assert [w for w, _ in (2 * (O.retain_loss() + O.forget_loss())).terms] == [2.0, 2.0]
    forget_only = objective.select(("forget",))
    assert forget_only.labels == ("forget/npo",)
    assert objective.describe()[0] == {
        "term": "forget/npo",
        "weight": 1.0,
        "side": "forget",
        "beta": 0.1,
    }


def test_bad_compositions_and_hyper_parameters_raise():
    with pytest.raises(TypeError, match="objectives combine"):
        O.npo() + 3
    with pytest.raises(ValueError, match="finite"):
        float("nan") * O.retain_loss()
    with pytest.raises(TypeError, match="Python number"):
        O.retain_loss() * "2"
    with pytest.raises(ValueError, match="beta"):
        O.npo(beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        O.simnpo(beta=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        O.simnpo(gamma=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        O.retain_kl(temperature=0.0)
    with pytest.raises(ValueError, match="term side"):
        O.Term("x", "both", lambda p, c, s: 0.0)


def test_terms_name_the_missing_side_and_the_wrong_task():
    with pytest.raises(ValueError, match=r"retain set.*no retain batch"):
        value(O.retain_loss(), context=ctx(retain=None))
    regression = Task(apply=lambda p, x: p["z"][x], kind="regression")
    with pytest.raises(ValueError, match=r"class probabilities.*regression"):
        O.retain_kl().as_objective().init(regression, {"z": jnp.asarray(Z)}, jax.random.key(0))


def test_docstring_examples():
    import doctest

    result = doctest.testmod(O, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
