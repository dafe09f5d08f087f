"""fit / fit_many on sequence data: the answer-token weights reach the loss, against a hand step.

A toy next-token model (embedding -> dense -> vocabulary) on random token sequences whose token
weights mark an "answer" span: one full-batch SGD step of ``fit`` is compared with a step on the
loss and its gradient written out in numpy, and changing the targets where the weights are 0 changes nothing.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from unlearn_jax.data import Dataset
from unlearn_jax.models import model_task
from unlearn_jax.training import create_train_state, fit, fit_many

VOCAB, T, N = 11, 6, 10
# float32 parameters after one step, compared with the same step computed another way.
RTOL, ATOL = 1e-5, 1e-6
LR = 0.5
SGD = optax.sgd(LR)  # one object: fits with the same shapes share one compiled step


class BigramLM(nn.Module):
    num_outputs: int
    kind = "sequence"

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_outputs)(nn.Embed(self.num_outputs, 8)(x))


def _data(seed=0, y_noise=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (N, T))
    y = rng.integers(0, VOCAB, (N, T))
    weights = np.zeros((N, T), np.float32)
    for i in range(N):  # an answer span [p, T - k) per row, as encode_qa marks it
        p, k = rng.integers(1, 3), rng.integers(0, 2)
        weights[i, p : T - k] = 1.0
    if y_noise:  # other targets where the weights are 0 (prompt and padding)
        y = np.where(weights > 0, y, (y + 1 + rng.integers(0, VOCAB - 1, y.shape)) % VOCAB)
    return Dataset(x, y, np.arange(N) + 100, "toy-seq", VOCAB, weights)


def _np_logits(params, x):
    """The bigram model in float64 numpy: ``E[x] @ W + b``, ``[N, T, V]``."""
    e = np.asarray(params["Embed_0"]["embedding"], np.float64)
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    return e[x] @ w + np.asarray(params["Dense_0"]["bias"], np.float64)


def _hand_loss_and_grads(params, ds):
    """mean_i sum_t w_it (-log softmax(z_it)[y_it]) and its gradient, written out in numpy
    (dL/dz = w (softmax(z) - onehot(y)) / N, then through the dense layer and the embedding)."""
    e = np.asarray(params["Embed_0"]["embedding"], np.float64)
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    h, z = e[ds.x], _np_logits(params, ds.x)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    onehot = np.eye(z.shape[-1])[ds.y]
    weights = np.asarray(ds.weights, np.float64)[..., None]
    loss = np.mean(np.sum(-weights[..., 0] * np.log((p * onehot).sum(-1)), axis=-1))
    g = weights * (p - onehot) / len(ds.x)  # [N, T, V]
    grad_e = np.zeros_like(e)
    np.add.at(grad_e, ds.x, g @ w.T)
    grads = {
        "Dense_0": {"bias": g.sum((0, 1)), "kernel": np.einsum("ntd,ntv->dv", h, g)},
        "Embed_0": {"embedding": grad_e},
    }
    return loss, grads


def test_fit_steps_on_the_answer_tokens_only():
    model = BigramLM(VOCAB)
    ds = _data()
    state = create_train_state(model, ds.x[:1], SGD, jax.random.key(0))
    trained, history = fit(
        state, model_task(model), ds, epochs=1, batch_size=N, key=jax.random.key(1), progress=False
    )
    # The reference in numpy (no second compilation, and independent of JAX's autodiff).
    loss, grads = _hand_loss_and_grads(state.params, ds)
    want = jax.tree.map(lambda p, g: p - LR * g, state.params, grads)
    for got, ref in zip(jax.tree.leaves(trained.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(history["loss"][0], loss, rtol=RTOL)
    # The end-of-epoch metric: the weighted next-token accuracy, per sequence, averaged.
    logits = _np_logits(trained.params, ds.x)
    hits = (logits.argmax(-1) == ds.y) * ds.weights
    want_acc = np.mean(hits.sum(1) / ds.weights.sum(1))
    assert history["train_token_acc"][0] == pytest.approx(want_acc, rel=1e-6)
    # Targets where the weights are 0 do not matter: the same step with other prompt targets.
    noisy = _data(y_noise=True)
    assert not np.array_equal(noisy.y, ds.y)
    again, _ = fit(
        state, model_task(model), noisy, epochs=1, batch_size=N, key=jax.random.key(1),
        progress=False,
    )  # fmt: skip
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(trained.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_many_on_sequences_equals_fit_per_model():
    model = BigramLM(VOCAB)
    ds = _data(seed=3)
    opt = SGD
    keys = jax.random.split(jax.random.key(5), 2)
    masks = np.ones((2, N), bool)
    masks[1, :3] = False  # model 1 never sees the first three sequences
    states, history = fit_many(
        model, model_task(model), ds.x[:1], opt, ds, keys=keys, epochs=2, batch_size=N,
        data_key=jax.random.key(7), member_masks=masks, progress=False,
    )  # fmt: skip
    assert history["train_token_acc"].shape == (2, 2)
    for m in range(2):
        alone, _ = fit(
            create_train_state(model, ds.x[:1], opt, keys[m]), model_task(model), ds, epochs=2,
            batch_size=N, key=jax.random.key(7), member_mask=masks[m], progress=False,
        )  # fmt: skip
        for a, b in zip(jax.tree.leaves(states.params), jax.tree.leaves(alone.params), strict=True):
            np.testing.assert_allclose(a[m], b, rtol=1e-5, atol=1e-5)


def test_sequence_targets_outside_the_vocabulary_are_named():
    model = BigramLM(VOCAB - 3)
    state = create_train_state(model, np.zeros((1, T), np.int32), SGD, jax.random.key(0))
    with pytest.raises(ValueError, match=r"target tokens in \[0, 10\].*vocabulary has 8 tokens"):
        ds = _data()
        ds = Dataset(np.minimum(ds.x, VOCAB - 4), ds.y, ds.ids, "toy", VOCAB, ds.weights)
        fit(state, model_task(model), ds, epochs=1, batch_size=4, key=jax.random.key(0))
