"""Composition of whole methods: sequence(a, b) equals running a, then b on its result."""

import jax
import numpy as np
import optax
import pytest

from tests.methods.test_many import setup
from unlearn_jax.methods import gradient as G
from unlearn_jax.methods.analytic import acu
from unlearn_jax.methods.compose import sequence
from unlearn_jax.methods.driver import unlearn, unlearn_many
from unlearn_jax.methods.protocol import with_run
from unlearn_jax.methods.ssd import ssd


def _model(tree, m):
    return jax.tree_util.tree_map(lambda a: a[m], tree)


def test_sequence_equals_its_stages_one_after_the_other():
    task, states, forget, retain = setup()
    state = _model(states, 0)
    dampen = ssd(alpha=2.0, lam=0.5)
    tune = G.finetune(optimizer=optax.adam(1e-2), steps=4)
    key = jax.random.key(7)
    combined = unlearn(sequence(dampen, tune), state, task, forget, retain, key=key, batch_size=16)
    first = unlearn(dampen, state, task, forget, retain, key=jax.random.fold_in(key, 0),
                    batch_size=16)  # fmt: skip
    second = unlearn(tune, first.state, task, forget, retain, key=jax.random.fold_in(key, 1),
                     batch_size=16)  # fmt: skip
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, combined.state.params, second.state.params
    )
    assert combined.method == "ssd>finetune" and combined.steps == 1 + 4
    np.testing.assert_array_equal(combined.metrics["stage1/loss"], second.metrics["loss"])
    assert combined.hparams["stages"][0]["method"] == "ssd"
    assert len(combined.method_state) == 2
    # SSD changed the model, and fine-tuning started from SSD's result, not from the original.
    assert first.metrics["ssd/num_selected"][0] > 0


def test_statistics_of_a_later_stage_are_taken_on_the_earlier_stages_result():
    # SalUn's saliency after SSD is the saliency of the dampened model.
    task, states, forget, retain = setup()
    state = _model(states, 0)
    dampen, salun = ssd(alpha=2.0, lam=0.0001), G.salun(learning_rate=1e-3, steps=1)
    key = jax.random.key(1)
    combined = unlearn(sequence(dampen, salun), state, task, forget, retain, key=key, batch_size=16)
    after_ssd = unlearn(dampen, state, task, forget, retain, key=jax.random.fold_in(key, 0),
                        batch_size=16).state  # fmt: skip
    direct = unlearn(salun, after_ssd, task, forget, retain, key=jax.random.fold_in(key, 1),
                     batch_size=16)  # fmt: skip
    mask_seq = combined.method_state[1].transform_state.mask
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, mask_seq, direct.method_state.transform_state.mask
    )


def test_sequence_of_stacked_models():
    task, states, forget, retain = setup()
    method = sequence(ssd(alpha=2.0, lam=0.5), G.npo(optimizer=optax.adam(1e-2), steps=2))
    many = unlearn_many(method, states, task, forget, retain, key=jax.random.key(3), batch_size=16)
    single = unlearn(method, _model(states, 1), task, forget, retain, key=jax.random.key(3),
                     batch_size=16)  # fmt: skip
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        _model(many.states.params, 1),
        single.state.params,
    )
    assert many.metrics["stage1/loss"].shape == (2, 2)


def test_the_guarantee_of_a_sequence_is_its_weakest_stage():
    assert sequence(acu(), acu()).guarantee == "exact"
    assert sequence(acu(), ssd()).guarantee == "approximate"
    assert with_run(G.npo(), steps=3).feeds.run == {"steps": 3}
    with pytest.raises(ValueError, match="fixes its own run length"):
        with_run(acu(), epochs=2)


def test_stages_need_their_own_run_length():
    with pytest.raises(ValueError, match="needs its own run length"):
        sequence(ssd(), G.finetune())
    with pytest.raises(ValueError, match="at least two"):
        sequence(ssd())
    task, states, forget, retain = setup()
    method = sequence(ssd(), G.finetune(steps=1))
    with pytest.raises(ValueError, match="own run lengths"):
        unlearn(method, _model(states, 0), task, forget, retain, key=jax.random.key(0), steps=3)
