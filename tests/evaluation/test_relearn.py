import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.core.task import Task
from unlearn_jax.data import Dataset
from unlearn_jax.evaluation import relearning_attack

TASK = Task(apply=lambda p, x: x @ p["w"] + p["b"][None])


def _two_blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2).astype(np.int32)
    x = rng.normal(size=(n, 2)) + np.where(y[:, None] == 1, 3.0, -3.0)
    return Dataset(x=x, y=y, ids=np.arange(n), num_classes=2)


def _hiding_params(offset):
    # A perfect separator for the blobs, with the class-1 logit pushed down by `offset`: the
    # knowledge is still in w, only hidden behind the bias (what a shallow unlearning method does).
    return {"w": jnp.array([[-1.0, 1.0], [-1.0, 1.0]]), "b": jnp.array([0.0, -offset])}


def test_hidden_knowledge_comes_back_and_held_out_recovery_is_measured():
    data = _two_blobs()
    forget = data.by_ids(data.ids[data.y == 1])
    params = _hiding_params(30.0)
    res = relearning_attack(
        TASK, params, forget, key=jax.random.key(0), num_examples=5, steps=60, learning_rate=1.0
    )
    m = res.metrics
    assert m["relearn/forget_acc_before"] == 0.0
    assert m["relearn/heldout_acc_before"] == 0.0
    assert m["relearn/heldout_acc_after"] > 0.9
    assert m["relearn/recovery"] == pytest.approx(m["relearn/heldout_acc_after"])
    assert m["relearn/examples"] == 5.0
    # The attack is pure: the input parameters are untouched.
    np.testing.assert_array_equal(params["b"], np.array([0.0, -30.0]))


def test_recovery_is_zero_when_nothing_is_hidden_and_all_examples_are_used():
    data = _two_blobs(n=20)
    forget = data.by_ids(data.ids[data.y == 1])
    res = relearning_attack(
        TASK, _hiding_params(0.0), forget, key=jax.random.key(1), num_examples=50, steps=5
    )
    assert "relearn/heldout_acc_after" not in res.metrics  # every forget example was used
    assert res.metrics["relearn/forget_acc_before"] == 1.0
    assert res.metrics["relearn/recovery"] == pytest.approx(0.0)


def test_bad_input_is_rejected():
    data = _two_blobs(n=10)
    with pytest.raises(ValueError, match="forget set is empty"):
        relearning_attack(TASK, _hiding_params(0.0), None, key=jax.random.key(0))
    with pytest.raises(ValueError, match="steps"):
        relearning_attack(TASK, _hiding_params(0.0), data, key=jax.random.key(0), steps=0)
    with pytest.raises(ValueError, match="classification"):
        relearning_attack(
            Task(TASK.apply, kind="regression"), _hiding_params(0.0), data, key=jax.random.key(0)
        )
