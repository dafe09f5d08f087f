"""LM unlearning: the sequence terms and every recipe's loss against hand computations.

A tiny facts set (4 authors). XLA compiles a training step in seconds on a CPU, so the terms and
recipes use a toy sequence model (an embedding, two residual tanh blocks named like the
transformer's, the tied unembedding) with the transformer's interface (``hidden_states(x, layer)``);
RMU's terms are traced on the real transformer. The terms and each recipe's whole objective are
checked against float64 numpy transcriptions of their formulas from the model's logits and
activations; one recipe (SAM over IdkDPO) runs through the driver."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unlearn_jax.data.facts import REFUSALS, generate_facts
from unlearn_jax.methods import lm
from unlearn_jax.methods import objectives as O
from unlearn_jax.methods.driver import unlearn
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import create_train_state

# float32 model outputs against float64 transcriptions of the same formulas.
RTOL = 1e-5
ATOL = 1e-5
WIDTH = 16


class ToyLM(nn.Module):
    """A sequence model with the transformer's interface: ``[B, T]`` tokens -> ``[B, T, V]``."""

    num_outputs: int
    kind = "sequence"

    def setup(self):
        self.embed = nn.Embed(self.num_outputs, WIDTH)
        self.layers_0 = nn.Dense(WIDTH)
        self.layers_1 = nn.Dense(WIDTH)

    def hidden_states(self, x, layer):
        h = self.embed(x)
        for block in (self.layers_0, self.layers_1)[:layer]:
            h = h + jnp.tanh(block(h))
        return h

    def __call__(self, x):
        return self.embed.attend(self.hidden_states(x, 2))


@functools.cache
def _setup():
    facts = generate_facts(seed=0, num_authors=4, num_holdout_authors=1)
    split = facts.forget_split(0.25)  # one author: 6 forget pairs, 18 + 56 retain pairs
    model = ToyLM(facts.tokenizer.vocab_size)
    task = model_task(model)
    state = create_train_state(model, facts.train.x[:1], optax.adam(1e-3), jax.random.key(0))
    ids = split.forget.ids
    refusals = facts.with_answers(ids, [REFUSALS[i % len(REFUSALS)] for i in range(len(ids))])
    return facts, split, model, task, state, refusals


@functools.cache
def _apply(task):
    return jax.jit(task.apply)


def _value(term, params, ctx, state=None):
    """A term's value, jitted (op-by-op evaluation would compile every primitive)."""
    states = {} if state is None else {term.name: state}
    return float(_objective_value(term.as_objective(), params, ctx, states))


def _objective_value(objective, params, ctx, states):
    """``objective.value``, jitted with the data as arguments: batches closed over would be constants
    that XLA spends seconds folding."""
    task = ctx.task

    def value(params, data, states):
        ref, forget, retain, key, step, progress = data
        ctx = O.Context(ref, forget, retain, key, task, step, progress)
        return objective.value(params, ctx, states)[0]

    data = (ctx.ref_params, ctx.forget, ctx.retain, ctx.key, ctx.step, ctx.progress)
    return jax.jit(value)(params, data, states)


@jax.jit
def _perturbed(params, scale=0.05, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )


def _batch(dataset, rows=None):
    b = {k: jnp.asarray(v) for k, v in dataset.as_batch().items()}
    n = b["x"].shape[0] if rows is None else rows
    b = {k: v[:n] for k, v in b.items()}
    b["mask"] = jnp.ones((n,), jnp.float32).at[-1].set(0.0)  # the last row plays padding
    return b


def _np_sequence_log_likelihood(task, params, batch):
    """sum_t w_t log softmax(z_t)[y_t] per row, in float64, from the model's logits."""
    z = np.asarray(_apply(task)(params, batch["x"]), np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    y, w = np.asarray(batch["y"]), np.asarray(batch["weights"], np.float64)
    rows, cols = np.indices(y.shape)
    return (w * log_p[rows, cols, y]).sum(axis=1), w.sum(axis=1)


def _np_log_sigmoid(v):
    return -np.logaddexp(0.0, -v)


def _ctx(task, ref_params, forget=None, retain=None):
    return O.Context(ref_params, forget, retain, jax.random.key(0), task, jnp.int32(0), 0.0)


def _masked_mean(values, mask):
    mask = np.asarray(mask, np.float64)
    return float((mask * values).sum() / mask.sum())


# ---- terms against hand computations ------------------------------------------------------------
def test_npo_on_sequences_matches_hand_computation():
    _, split, _, task, state, _ = _setup()
    params, ref = _perturbed(state.params), state.params
    batch = _batch(split.forget)
    beta = 0.3
    got = _value(O.npo(beta=beta), params, _ctx(task, ref, forget=batch))
    lp, _ = _np_sequence_log_likelihood(task, params, batch)
    lp_ref, _ = _np_sequence_log_likelihood(task, ref, batch)
    want = -(2 / beta) * _masked_mean(_np_log_sigmoid(-beta * (lp - lp_ref)), batch["mask"])
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # At the reference, NPO is (2/beta) log 2 whatever the data.
    at_ref = _value(O.npo(beta=beta), ref, _ctx(task, ref, forget=batch))
    np.testing.assert_allclose(at_ref, 2 / beta * np.log(2), rtol=RTOL)


def test_simnpo_on_sequences_uses_the_answer_length():
    _, split, _, task, state, _ = _setup()
    params = _perturbed(state.params)
    batch = _batch(split.forget)
    beta, gamma = 2.5, 0.5
    got = _value(O.simnpo(beta=beta, gamma=gamma), params, _ctx(task, None, forget=batch))
    lp, length = _np_sequence_log_likelihood(task, params, batch)
    want = -(2 / beta) * _masked_mean(_np_log_sigmoid(-beta / length * lp - gamma), batch["mask"])
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_dpo_loss_matches_its_formula():
    rng = np.random.default_rng(0)
    cw, cwr, cl, clr = (rng.normal(-20, 5, 6) for _ in range(4))
    mask = np.array([1, 1, 0, 1, 1, 1], np.float32)
    beta = 0.7
    got = O.dpo_loss(*(jnp.asarray(v, jnp.float32) for v in (cw, cwr, cl, clr)), beta, mask)
    margin = (cw - cwr) - (cl - clr)
    want = -(2 / beta) * _masked_mean(np.log(1 / (1 + np.exp(-beta * margin))), mask)
    np.testing.assert_allclose(float(got), want, rtol=RTOL)
    # Rafailov et al.'s loss is beta/2 times this one.
    rafailov = -_masked_mean(np.log(1 / (1 + np.exp(-beta * margin))), mask)
    np.testing.assert_allclose(float(got) * beta / 2, rafailov, rtol=RTOL)


def test_idk_dpo_prefers_the_refusal_looked_up_by_id():
    _, split, _, task, state, refusals = _setup()
    params, ref = _perturbed(state.params), state.params
    # The forget batch in another order than the refusals: the lookup goes by id.
    order = np.array([3, 0, 5, 1, 4, 2])
    forget = split.forget.take(order)
    batch = _batch(forget)
    term = O.idk_dpo(refusals, beta=0.2)
    got = _value(term, params, _ctx(task, ref, forget=batch), term.init(params, jax.random.key(0)))
    alt = _batch(refusals.by_ids(forget.ids))
    lw, _ = _np_sequence_log_likelihood(task, params, alt)
    lwr, _ = _np_sequence_log_likelihood(task, ref, alt)
    ll, _ = _np_sequence_log_likelihood(task, params, batch)
    llr, _ = _np_sequence_log_likelihood(task, ref, batch)
    margin = (lw - lwr) - (ll - llr)
    want = -(2 / 0.2) * _masked_mean(_np_log_sigmoid(0.2 * margin), batch["mask"])
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # IdK NLL: the refusals' sequence loss, same lookup.
    nll = O.idk_nll(refusals)
    got_nll = _value(
        nll, params, _ctx(task, None, forget=batch), nll.init(params, jax.random.key(0))
    )
    np.testing.assert_allclose(got_nll, _masked_mean(-lw, batch["mask"]), rtol=RTOL)


def test_lookup_answers_masks_unknown_ids_and_padding():
    _, split, _, _, _, refusals = _setup()
    table = O.answer_table(refusals.take(np.array([0, 2, 4])))
    batch = _batch(split.forget)  # 6 rows, the last one padding
    got = O.lookup_answers(table, batch)
    known = np.isin(np.asarray(batch["id"]), refusals.ids[[0, 2, 4]])
    np.testing.assert_array_equal(np.asarray(got["mask"]), known * np.asarray(batch["mask"]))
    for row in np.flatnonzero(known):
        want = refusals.by_ids([int(batch["id"][row])])
        np.testing.assert_array_equal(np.asarray(got["y"][row]), want.y[0])


@functools.cache
def _hidden_fn(model, layer):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, layer, method="hidden_states"))


def _np_hidden(model, params, x, layer):
    return np.asarray(_hidden_fn(model, layer)(params, x), np.float64)


def test_rmu_losses_match_their_definition():
    _, split, model, task, state, _ = _setup()
    params, ref = _perturbed(state.params), state.params
    forget, retain = _batch(split.forget), _batch(split.retain, rows=8)
    layer, c = 1, 3.0
    term = O.rmu_forget(layer, c)
    key = term.init(params, jax.random.key(5))
    got = _value(term, params, _ctx(task, ref, forget=forget), key)
    r = np.asarray(jax.random.uniform(key, (WIDTH,)), np.float64)
    u = r / np.linalg.norm(r)
    assert np.all(u >= 0) and np.isclose(np.linalg.norm(u), 1.0)
    h = _np_hidden(model, params, forget["x"], layer)
    w = np.asarray(forget["weights"], np.float64)
    per_row = (w * ((h - c * u) ** 2).sum(-1)).sum(1) / w.sum(1)
    np.testing.assert_allclose(got, _masked_mean(per_row, forget["mask"]), rtol=RTOL)

    got_r = _value(O.rmu_retain(layer), params, _ctx(task, ref, retain=retain))
    h, h0 = (
        _np_hidden(model, params, retain["x"], layer),
        _np_hidden(model, ref, retain["x"], layer),
    )
    w = np.asarray(retain["weights"], np.float64)
    per_row = (w * ((h - h0) ** 2).sum(-1)).sum(1) / w.sum(1)
    np.testing.assert_allclose(got_r, _masked_mean(per_row, retain["mask"]), rtol=RTOL)
    # At the frozen model the retain loss vanishes (up to XLA folding the two forward passes apart).
    assert abs(_value(O.rmu_retain(layer), ref, _ctx(task, ref, retain=retain))) < 1e-10


def test_retain_sequence_kl_matches_hand_computation():
    _, split, _, task, state, _ = _setup()
    params, ref = _perturbed(state.params), state.params
    batch = _batch(split.retain, rows=8)
    got = _value(O.retain_sequence_kl(temperature=2.0), params, _ctx(task, ref, retain=batch))
    want = _masked_mean(_np_kl(task, params, ref, batch, 2.0), batch["mask"])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ---- recipes: each one's loss, and a few through the driver --------------------------------------
ADAM = optax.adam(1e-3)
RECIPES = ("ga", "grad_diff", "npo", "simnpo", "idk_nll", "idk_dpo", "rmu")
# Compiling a driver step costs seconds on a CPU: one recipe runs through it (SAM over the refusal
# recipe: the answer lookup inside the SAM step); every recipe's loss is checked against its formula
# without it, and RMU's frozen blocks through its transform (the driver's own tests hold that masked
# weights stay bit-identical, and unlearn_many to unlearn).
DRIVER_RECIPES = ("sam+idk_dpo",)


@functools.cache
def _recipe(name):
    # Cached: the driver's compiled steps are keyed on the method's functions, so a test that reuses
    # a method compiles nothing new.
    refusals = _setup()[-1]
    return {
        "ga": lambda: lm.gradient_ascent(optimizer=ADAM),
        "grad_diff": lambda: lm.grad_diff(retain="kl", optimizer=ADAM),
        "npo": lambda: lm.npo(optimizer=ADAM),
        "simnpo": lambda: lm.simnpo(optimizer=ADAM),
        "idk_nll": lambda: lm.idk_nll(refusals, optimizer=ADAM),
        "idk_dpo": lambda: lm.idk_dpo(refusals, optimizer=ADAM),
        "rmu": lambda: lm.rmu(1, coefficient=10.0, alpha=10.0, optimizer=ADAM),
        "sam+idk_dpo": lambda: lm.sam(lm.idk_dpo(refusals, optimizer=ADAM), rho=0.05),
    }[name]()


def _np_kl(task, params, ref, batch, temperature):
    """T^2 KL(softmax(z_ref / T) || softmax(z / T)) per token, answer-weighted mean per row."""

    def log_softmax(z):
        z = np.asarray(z, np.float64) / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt = log_softmax(_apply(task)(ref, batch["x"]))
    ls = log_softmax(_apply(task)(params, batch["x"]))
    kl = temperature**2 * (np.exp(lt) * (lt - ls)).sum(-1)
    w = np.asarray(batch["weights"], np.float64)
    return (w * kl).sum(1) / w.sum(1)


def _np_rmu(model, params, ref, batch, layer, target):
    """Answer-weighted mean over tokens of ||h(x)_t - target_t||^2 per row (target [D] or h_ref)."""
    h = _np_hidden(model, params, batch["x"], layer)
    if target is None:
        target = _np_hidden(model, ref, batch["x"], layer)
    w = np.asarray(batch["weights"], np.float64)
    return (w * ((h - target) ** 2).sum(-1)).sum(1) / w.sum(1)


def _np_recipe_loss(name, model, task, params, ref, forget, retain, refusals, states):
    """Each recipe's objective written out from its docstring (registry defaults: NPO's beta 0.1 and
    retain weight 1, SimNPO's beta 2.5, gamma 0 and retain weight 0.125, IdK's retain weight 1)."""
    fm, rm = forget["mask"], retain["mask"]
    lp, length = _np_sequence_log_likelihood(task, params, forget)
    lp_ref, _ = _np_sequence_log_likelihood(task, ref, forget)
    retain_nll = _masked_mean(-_np_sequence_log_likelihood(task, params, retain)[0], rm)
    alt = _batch(refusals.by_ids(np.asarray(forget["id"])))
    lw, _ = _np_sequence_log_likelihood(task, params, alt)
    lw_ref, _ = _np_sequence_log_likelihood(task, ref, alt)
    base = name
    if base == "ga":
        return _masked_mean(lp, fm)
    if base == "grad_diff":
        return _masked_mean(lp, fm) + _masked_mean(_np_kl(task, params, ref, retain, 1.0), rm)
    if base == "npo":
        return -(2 / 0.1) * _masked_mean(_np_log_sigmoid(-0.1 * (lp - lp_ref)), fm) + retain_nll
    if base == "simnpo":
        simnpo = -(2 / 2.5) * _masked_mean(_np_log_sigmoid(-2.5 / length * lp), fm)
        return simnpo + 0.125 * retain_nll
    if base == "idk_nll":
        return _masked_mean(-lw, fm) + retain_nll
    if base == "idk_dpo":
        margin = (lw - lw_ref) - (lp - lp_ref)
        return -(2 / 0.1) * _masked_mean(_np_log_sigmoid(0.1 * margin), fm) + retain_nll
    assert base == "rmu"
    (key,) = states.values()  # the forget term's state: the key of its direction
    u = np.asarray(O.rmu_direction(key, WIDTH), np.float64)
    steer = _masked_mean(_np_rmu(model, params, ref, forget, 1, 10.0 * u), fm)
    return steer + 10.0 * _masked_mean(_np_rmu(model, params, ref, retain, 1, None), rm)


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipes_loss_matches_its_formula(name):
    _, split, model, task, state, refusals = _setup()
    params, ref = _perturbed(state.params), state.params
    method = _recipe(name)
    assert method.name == name
    json.dumps(method.hparams)
    (phase,) = method.recipe.phases
    forget, retain = (
        _batch(split.forget.take(np.array([3, 0, 5, 1, 4, 2]))),
        _batch(split.retain, 8),
    )
    ctx = _ctx(task, ref, forget=forget, retain=retain)
    states = phase.objective.init(task, ref, jax.random.key(4))
    loss = _objective_value(phase.objective, params, ctx, states)
    want = _np_recipe_loss(name, model, task, params, ref, forget, retain, refusals, states)
    np.testing.assert_allclose(float(loss), want, rtol=RTOL, atol=ATOL)
    # The SAM version minimises the same objective (only where its gradient is taken changes).
    wrapped = lm.sam(method, rho=0.05)
    assert wrapped.name == f"sam+{name}" and wrapped.recipe.phases == method.recipe.phases


RUN = dict(key=jax.random.key(0), steps=3, batch_size=8)


def _moved(before, after):
    """``{top-level name: whether any of its leaves changed}``."""
    out = {}
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after), strict=True
    ):
        name = str(path[0].key)
        out[name] = out.get(name, False) or not np.array_equal(np.asarray(a), np.asarray(b))
    return out


@pytest.mark.parametrize("name", DRIVER_RECIPES)
def test_recipes_unlearn_through_the_driver(name):
    _, split, _, task, state, _ = _setup()
    method = _recipe(name)
    result = unlearn(method, state, task, split.forget, split.retain, progress=False, **RUN)
    after = result.state
    assert result.method == name and result.steps == 3
    assert np.all(np.isfinite(result.metrics["loss"]))
    assert all(_moved(state.params, after.params).values())
    assert "sam/forget_grad_norm" in result.metrics


def test_rmu_moves_only_the_block_before_its_activations():
    _, _, _, _, state, _ = _setup()
    transform = _recipe("rmu").recipe.transform  # activations after 1 block: only layers_0 moves
    t_state = transform.init(state.params, jax.random.key(0), {})
    ones = jax.tree.map(jnp.ones_like, state.params)
    grads, _ = transform.update(ones, t_state, state.params)
    kept = {k: {bool(np.any(g)) for g in jax.tree.leaves(v)} for k, v in grads.items()}
    assert kept == {"embed": {False}, "layers_0": {True}, "layers_1": {False}}
    mask = {
        k: {bool(m) for m in jax.tree.leaves(v)} for k, v in transform.update_mask(t_state).items()
    }
    assert mask == kept


def test_rmu_reads_the_transformers_hidden_states_and_trains_its_blocks():
    # Traced, not compiled or even run (XLA takes seconds to compile a transformer on a CPU, and
    # initialising it op by op compiles every primitive): abstract parameters throughout.
    facts, split, _, _, _, _ = _setup()
    model = get_model(
        "transformer", num_outputs=facts.tokenizer.vocab_size, d_model=16, num_layers=3,
        num_heads=2, mlp_dim=32, max_len=facts.train.x.shape[1],
    )  # fmt: skip
    task = model_task(model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), facts.train.x[:1])["params"])
    forget, retain = _batch(split.forget), _batch(split.retain, rows=8)
    for term in (O.rmu_forget(2, 5.0), O.rmu_retain(2)):
        state = term.init(params, jax.random.key(0)) if term.init else None
        value = jax.eval_shape(
            lambda p, t=term, s=state: t.fn(p, _ctx(task, p, forget=forget, retain=retain), s),
            params,
        )  # fmt: skip
        assert value.shape == () and value.dtype == jnp.float32
    mask = lm.trainable(lm.rmu_blocks(2)).init(params, jax.random.key(0), {})
    flags = {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): bool(m)
        for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert {n.split("/")[0] for n, f in flags.items() if f} == {"layers_0", "layers_1"}
    assert lm.rmu_blocks(5) == ("layers_2", "layers_3", "layers_4")


def test_idk_recipes_refuse_forget_ids_without_an_answer():
    _, split, _, task, state, refusals = _setup()
    partial = refusals.take(np.arange(3))
    for method in (lm.idk_dpo(partial), lm.sam(lm.idk_nll(partial))):
        with pytest.raises(ValueError, match="3 forget ids have no alternate answer"):
            unlearn(method, state, task, split.forget, split.retain, **RUN)


def test_bad_arguments_are_named():
    refusals = _setup()[-1]
    with pytest.raises(ValueError, match="retain"):
        lm.npo(retain="mse")
    with pytest.raises(ValueError, match="layer must be an integer >= 1"):
        lm.rmu(0)
    with pytest.raises(TypeError, match="sequence Dataset"):
        O.idk_nll(refusals.as_batch())
    with pytest.raises(ValueError, match="no parameter path starts with"):
        lm.trainable(["encoder"]).init({"layers_0": {"w": jnp.zeros(2)}}, jax.random.key(0), {})
