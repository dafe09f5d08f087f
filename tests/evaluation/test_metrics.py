import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.core.task import Task
from unlearn_jax.evaluation import metrics

RTOL_F32 = 1e-6  # float32 logits of a 3x3 matmul against a float64 numpy reference
ATOL_F32 = 1e-6


class _Traced:
    """A linear classifier f(x) = x @ w that counts how often JAX traces it (the retrace guard)."""

    def __init__(self):
        self.traces = 0

    def __call__(self, params, x):
        self.traces += 1
        return x @ params["w"]


def _reference(x, y):
    """Accuracy and mean cross-entropy with w = I, written in float64 numpy."""
    x = np.asarray(x, np.float64)
    log_z = np.log(np.sum(np.exp(x), axis=1))
    loss = log_z - x[np.arange(len(y)), y]
    return float(np.mean(np.argmax(x, axis=1) == y)), float(np.mean(loss))


def _sets(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("forget", 5), ("retain", 12), ("test", 9)):
        out[name] = (rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 3, n))
    return out


def test_accuracy_metrics_by_hand_with_chunks_and_every_input_kind():
    apply = _Traced()
    task = Task(apply=apply)
    params = {"w": jnp.eye(3)}
    sets = _sets()
    forget = types.SimpleNamespace(x=sets["forget"][0], y=sets["forget"][1])  # x/y attributes
    retain = {"x": sets["retain"][0], "y": sets["retain"][1]}  # a mapping

    class WithBatch:  # the Dataset protocol
        def as_batch(self):
            return {"x": sets["test"][0], "y": sets["test"][1], "id": np.arange(9)}

    got = metrics.accuracy_metrics(
        task, params, forget=forget, retain=retain, test=WithBatch(), batch_size=4
    )
    for group in ("forget", "retain", "test"):
        acc, loss = _reference(*sets[group])
        assert got[f"{group}/acc"] == pytest.approx(acc, abs=1e-12)
        assert got[f"{group}/loss"] == pytest.approx(loss, rel=RTOL_F32, abs=ATOL_F32)
    assert got["UA"] == pytest.approx(100 * (1 - got["forget/acc"]))
    assert got["RA"] == pytest.approx(100 * got["retain/acc"])
    assert got["TA"] == pytest.approx(100 * got["test/acc"])
    # Every chunk (5 -> 4 + padded 1, 12 -> 3 x 4, 9 -> 2 x 4 + padded 1) has shape [4, 3]: one trace.
    assert apply.traces == 1
    again = metrics.accuracy_metrics(
        task, params, forget=forget, retain=retain, test=WithBatch(), batch_size=4
    )
    assert again == got and apply.traces == 1
    whole = metrics.accuracy_metrics(task, params, forget=forget, retain=retain, test=None)
    assert "test/acc" not in whole and "TA" not in whole
    assert whole["retain/acc"] == got["retain/acc"]


def test_accuracy_metrics_with_the_library_dataset():
    data = pytest.importorskip("unlearn_jax.data")
    sets = _sets(1)
    datasets = {
        name: data.Dataset(x, y, np.arange(len(y)) + 100 * i, name, 3)
        for i, (name, (x, y)) in enumerate(sets.items())
    }
    got = metrics.accuracy_metrics(Task(apply=lambda p, x: x @ p), jnp.eye(3), **datasets)
    for group in sets:
        assert got[f"{group}/acc"] == pytest.approx(_reference(*sets[group])[0], abs=1e-12)


def test_regression_metrics_by_hand():
    task = Task(apply=lambda p, x: x * p, kind="regression")
    forget = {"x": np.array([[1.0], [2.0]], np.float32), "y": np.array([1.0, 0.0], np.float32)}
    retain = {"x": np.array([[1.0], [3.0], [0.0]], np.float32), "y": np.zeros(3, np.float32)}
    got = metrics.accuracy_metrics(task, 2.0, forget=forget, retain=retain, test=None, batch_size=2)
    # forget predictions 2, 4 vs targets 1, 0: squared errors 1, 16; retain 4, 36, 0.
    assert got["forget/mse"] == pytest.approx(8.5)
    assert got["forget/loss"] == pytest.approx(4.25)  # half squared error
    assert got["retain/mse"] == pytest.approx(40 / 3)
    assert "UA" not in got and "forget/acc" not in got


def test_compute_outputs_and_evaluate_unlearning():
    task = Task(apply=lambda p, x: x @ p)
    sets = _sets(2)
    outputs, targets = metrics.compute_outputs(
        task, jnp.eye(3), {"x": sets["retain"][0], "y": sets["retain"][1]}, batch_size=5
    )
    np.testing.assert_allclose(outputs, sets["retain"][0], rtol=RTOL_F32, atol=ATOL_F32)
    np.testing.assert_array_equal(targets, sets["retain"][1])
    rows = {k: {"x": x, "y": y} for k, (x, y) in sets.items()}
    got = metrics.evaluate_unlearning(task, jnp.eye(3), **rows, key=jax.random.key(0))
    assert set(metrics.TABLE_KEYS) <= set(got)
    assert 0.0 <= got["MIA-Efficacy"] <= 100.0


def test_gap_to_retrain_by_hand_reproduces_the_salun_table():
    # SalUn paper, CIFAR-10 ResNet-18, 10% random forgetting (UA, RA, TA, MIA-Efficacy in %).
    retrain = {"UA": 5.24, "RA": 100.0, "TA": 94.26, "MIA-Efficacy": 12.88}
    salun = {"UA": 2.85, "RA": 99.62, "TA": 93.93, "MIA-Efficacy": 14.39, "extra": 1.0}
    gaps = metrics.gap_to_retrain(salun, retrain)
    assert gaps["gap/UA"] == pytest.approx(2.39)
    assert gaps["gap/RA"] == pytest.approx(0.38)
    assert gaps["gap/TA"] == pytest.approx(0.33)
    assert gaps["gap/MIA-Efficacy"] == pytest.approx(1.51)
    assert gaps["avg_gap"] == pytest.approx((2.39 + 0.38 + 0.33 + 1.51) / 4)
    assert round(gaps["avg_gap"], 2) == 1.15  # the "Avg. Gap" the paper prints for SalUn
    assert set(gaps) == {"gap/UA", "gap/RA", "gap/TA", "gap/MIA-Efficacy", "avg_gap"}


def test_speedup():
    assert metrics.speedup(2.7, 43.0) == pytest.approx(43.0 / 2.7)
    with pytest.raises(ValueError, match="method_time must be a finite number > 0"):
        metrics.speedup(0.0, 43.0)


def test_bad_inputs_are_named():
    task = Task(apply=lambda p, x: x @ p)
    with pytest.raises(KeyError, match="'MIA-Efficacy'"):
        metrics.gap_to_retrain({"UA": 1.0}, {"UA": 2.0}, keys=("UA", "MIA-Efficacy"))
    with pytest.raises(ValueError, match="nan"):
        metrics.gap_to_retrain({"UA": float("nan")}, {"UA": 2.0}, keys=("UA",))
    with pytest.raises(ValueError, match="forget is empty"):
        metrics.accuracy_metrics(
            task,
            jnp.eye(3),
            forget={"x": np.zeros((0, 3)), "y": np.zeros(0, int)},
            retain=None,
            test=None,
        )
    with pytest.raises(TypeError, match="retain must be a Dataset"):
        metrics.accuracy_metrics(task, jnp.eye(3), forget=None, retain=[1, 2], test=None)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        metrics.accuracy_metrics(
            task,
            jnp.eye(3),
            forget={"x": np.zeros((4, 3)), "y": np.zeros(3, int)},
            retain=None,
            test=None,
        )
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.accuracy_metrics(
            task,
            jnp.full((3, 3), jnp.nan),
            forget={"x": np.ones((2, 3)), "y": np.zeros(2, int)},
            retain=None,
            test=None,
        )
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        metrics.accuracy_metrics(
            task, jnp.eye(3), forget=None, retain=None, test=None, batch_size=0
        )
