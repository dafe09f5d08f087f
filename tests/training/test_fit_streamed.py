"""fit on a StreamedDataset: batches read step by step, the same model as the in-memory fit."""

import jax
import numpy as np

from tests._training_setup import ADAM, BATCH, classification, mlp
from unlearn_jax.data import Dataset, StreamedDataset
from unlearn_jax.data.stream import as_streamed
from unlearn_jax.models import model_task
from unlearn_jax.training import create_train_state, fit, minibatch


class _Pixels:
    """uint8 records: inputs stored as bytes, read as ``x / 255`` float32 by the model."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_streamed_fit_equals_the_in_memory_fit_and_never_uploads_the_data_set(monkeypatch):
    data, test = classification(), classification(n=20, seed=1)
    model = mlp()
    state = create_train_state(model, data.x[:1], ADAM, jax.random.key(0))
    mask = np.arange(len(data.ids)) % 4 > 0  # member weights travel with the streamed batches
    kwargs = dict(epochs=2, batch_size=BATCH, key=jax.random.key(1), progress=False)
    want, want_history = fit(state, model_task(model), data, test=test, member_mask=mask, **kwargs)

    def no_upload(*args, **kwargs):
        raise AssertionError("a streamed fit must not copy the data set to the device")

    monkeypatch.setattr(minibatch, "_device_data", no_upload)
    got, history = fit(
        state, model_task(model), as_streamed(data), test=as_streamed(test), member_mask=mask,
        **kwargs,
    )  # fmt: skip
    # The same rows in the same order through the same step: bit for bit.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert history == want_history

    # uint8 storage, made float32 on the device, against the in-memory x / 255.
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (24, 5), dtype=np.uint8)
    labels = rng.integers(0, 3, 24)
    stream = StreamedDataset(_Pixels(pixels, labels), num_classes=3, x_divisor=255.0)
    memory = Dataset(x=pixels.astype(np.float32) / np.float32(255.0), y=labels,
                     ids=np.arange(24), num_classes=3)  # fmt: skip
    got, history = fit(state, model_task(model), stream, **kwargs)
    monkeypatch.undo()
    want, want_history = fit(state, model_task(model), memory, **kwargs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert history == want_history
