r"""Training: create a ``TrainState``, fit one model or many at once (``vmap``), retrain without ids.

One training recipe serves every model this library trains: the original model, the retrained
oracle (the gold standard of exact unlearning) and the shadow models of membership inference.

The recipe. Each epoch ``e`` draws a permutation of the ``N`` training examples from
``fold_in(key, e)`` and cuts it into ``S = ceil(N / B)`` batches of ``B`` rows; the last batch is
padded to ``B`` rows with a mask, so ONE compiled step serves every batch. A step minimises

.. math::
    L(\theta) = \frac{\sum_{i \in \text{batch}} m_i\, \ell(\theta; x_i, y_i)}
                     {\sum_{i \in \text{batch}} m_i} + R(\theta; \text{batch}, m),

where ``m_i`` is 0 on padding rows and otherwise the example's member weight (1 unless a member mask
says otherwise), ``ell`` is the task's per-example loss and ``R`` an optional regulariser. A batch
whose weights are all zero (possible only with member masks) leaves the state untouched, optimizer
state and step counter included.

Everything is a deterministic function of the keys: the same init key gives the same initial
parameters, the same data key the same batch order, hence bit-identical results on one machine.
Epoch ``e`` visits the examples in the order of
``unlearn_jax.data.padded_batches(train, B, key=fold_in(key, e))``, so which steps saw a given
example can be recomputed from the key.

Compilation. The step is compiled once per task, regularizer, model configuration, optimizer OBJECT
(optax transformations compare by identity: pass the same one to reuse a compiled step), batch size
and dataset size rounded up to a multiple of 128 (the device copy of the data is padded), so
retraining on ``N - |forget|`` examples usually reuses the step compiled for ``N``.

Meshes. With ``mesh=`` (and optionally ``rules=``, ``logical=``) the same step runs under a
:class:`~unlearn_jax.sharding.Placement`: it is jitted with the state's shardings from the rules as
``in_shardings`` and ``out_shardings`` and donates the state, and each gathered batch is split over
the batch axes (rows padded with weight-0 rows to a multiple of their devices). The compiled step is
cached per placement as well. ``mesh=None`` is the single-device path, unchanged.

Streamed data. A :class:`~unlearn_jax.data.StreamedDataset` is never copied to the device: the same
step receives the batch of rows ``idx[s]`` read on the host (and gathers positions ``0..B-1`` of it),
so the batches, and the trained model, are those of the in-memory run.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax.core import meta as flax_meta
from flax.training import train_state as flax_train_state

from unlearn_jax import _validate
from unlearn_jax.core.task import CLASSIFICATION, REGRESSION, SEQUENCE, Task
from unlearn_jax.data.batching import pad_rows, read_rows
from unlearn_jax.data.stream import StreamedDataset, prefetched, to_device
from unlearn_jax.sharding.placement import Frozen, Placement
from unlearn_jax.sharding.placement import placement as make_placement
from unlearn_jax.sharding.rules import ShardingRules

TrainState = flax_train_state.TrainState
History = dict[str, list[float]]
Regularizer = Callable[[Any, dict[str, jax.Array], jax.Array], jax.Array]

DEFAULT_EVAL_BATCH_SIZE = 1024
_ROW_BUCKET = 128
# The per-epoch metric of each task kind: accuracy, squared error, weighted next-token accuracy.
_METRICS = {CLASSIFICATION: "acc", REGRESSION: "mse", SEQUENCE: "token_acc"}


class RetrainResult(NamedTuple):
    """The outcome of :func:`retrain` (and :func:`train_original`).

    Attributes:
      state: the trained ``TrainState``.
      history: per-epoch metrics, as returned by :func:`fit`.
      wall_time: seconds spent in :func:`fit`, measured with ``time.perf_counter`` after
        ``block_until_ready`` on the final state (compilation of the step included).
      retained_ids: ``[N - |forget|]`` int64 ids of the examples trained on, in dataset order.
    """

    state: TrainState
    history: History
    wall_time: float
    retained_ids: np.ndarray


# ---- TrainState ----------------------------------------------------------------------------------
def create_train_state(
    model: Any, sample_input: Any, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """Initialises a Flax linen model and an optax optimizer into a ``TrainState``.

    Args:
      model: a Flax linen module whose only variable collection is ``"params"``.
      sample_input: a batch of inputs ``[B, ...]`` (``B >= 1``) with the shape of the real inputs,
        e.g. ``train.x[:1]``; only its shape and dtype matter.
      optimizer: an optax ``GradientTransformation``.
      key: the PRNG key of the parameter initialisation.

    Returns:
      ``TrainState(step=0 (int32 array), params, opt_state, apply_fn=model.apply, tx=optimizer)``.

    Raises:
      TypeError: if ``optimizer`` is not an optax transformation.
      ValueError: if ``sample_input`` has no batch axis or is empty, or the model has variable
        collections besides ``"params"`` (e.g. BatchNorm's ``"batch_stats"``).
    """
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (e.g. optax.adam(1e-3)), got "
            f"{type(optimizer).__name__}."
        )
    shape = np.shape(sample_input)
    if len(shape) == 0 or shape[0] == 0:
        raise ValueError(
            f"sample_input must be a non-empty batch of inputs [B, ...] (e.g. train.x[:1]), got shape "
            f"{shape}."
        )
    collections = jax.eval_shape(model.init, key, sample_input)
    extra = sorted(set(collections) - {"params"})
    if extra:
        raise ValueError(
            f"{type(model).__name__} has variable collections {extra} besides 'params'. unlearn_jax "
            "trains stateless models only: per-example gradients are undefined for layers that mix "
            "examples (BatchNorm's 'batch_stats'); use GroupNorm or LayerNorm instead."
        )
    if "params" not in collections:
        raise ValueError(f"{type(model).__name__} has no parameters to train.")
    try:
        hash(model), hash(optimizer)
    except TypeError:  # unhashable attributes cannot be static arguments: initialise eagerly
        params, opt_state = _init_arrays.__wrapped__(model, optimizer, key, sample_input)
        apply_fn = model.apply
    else:
        params, opt_state = _init_arrays(model, optimizer, key, jnp.asarray(sample_input))
        apply_fn = _canonical_apply(model)
    return TrainState(
        # An int32 array, not the Python int 0: a weakly typed step would retrace the step once.
        step=jnp.asarray(np.int32(0)),
        apply_fn=apply_fn,
        params=params,
        tx=optimizer,
        opt_state=opt_state,
    )


# ---- the jitted pieces ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _canonical_apply(model: Any) -> Callable:
    # `apply_fn` is a static field of the TrainState, hence part of the jitted step's signature, and
    # bound methods of two equal modules compare unequal (identity of `self`): one bound method per
    # module configuration lets equal models share compiled steps.
    return model.apply


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_arrays(model: Any, optimizer: Any, key: jax.Array, sample_input: jax.Array):
    # One jitted program (compiled once per model config, optimizer and input shape, cached across
    # calls) rather than eager initialisers, each of which would compile on its own.
    # Plain arrays: models annotated with logical axis names (the transformer) return
    # nn.LogicallyPartitioned boxes; unlearn_jax.sharding reads those names from eval_shape instead.
    params = flax_meta.unbox(model.init(key, sample_input)["params"])
    return params, optimizer.init(params)


def _padded_rows(n: int) -> int:
    """Rows of the device copy of an ``n``-example dataset: ``n`` rounded up to a multiple of 128.

    Compiled steps depend on the array shapes; bucketing the dataset size lets a retrain on
    ``N - |forget|`` examples (and small test sets) reuse the step compiled for ``N``.
    """
    return -(-n // _ROW_BUCKET) * _ROW_BUCKET


def _device_data(
    ds: Any, weights: np.ndarray, sharding: jax.sharding.Sharding | None = None
) -> tuple[dict[str, jax.Array], jax.Array]:
    """``{"x", "y", "id"}`` (and the token ``"weights"`` ``[N, T]`` of a sequence dataset) padded to
    :func:`_padded_rows` rows (copies of row 0, id -1), on device (placed with ``sharding`` when
    given, e.g. replicated over a mesh), and the member weights ``[..., N]`` padded with zeros
    (padding rows never count)."""
    n = len(ds.ids)
    pad = _padded_rows(n) - n
    fill = np.zeros((pad,), np.int64)
    data = {
        "x": np.concatenate([ds.x, ds.x[fill]]),
        "y": np.concatenate([ds.y, ds.y[fill]]),
        "id": np.concatenate([np.asarray(ds.ids, np.int64), np.full((pad,), -1)]).astype(np.int32),
    }
    token_weights = getattr(ds, "weights", None)
    if token_weights is not None:
        # The loss of a sequence counts the answer tokens only (Task.output_losses reads them).
        data["weights"] = np.concatenate([token_weights, token_weights[fill]])
    weights = np.concatenate([weights, np.zeros((*weights.shape[:-1], pad), np.float32)], axis=-1)
    if sharding is not None:
        return jax.device_put((data, weights), sharding)
    return {k: jnp.asarray(v) for k, v in data.items()}, jnp.asarray(weights)


def _epoch_plan(key: jax.Array, epoch: int, *, n: int, batch_size: int):
    """Row indices ``[S', B]`` (int32) of an epoch's batches and their validity ``[S', B]``.

    The order is ``jax.random.permutation(fold_in(key, epoch), n)``, the order of
    :func:`unlearn_jax.data.padded_batches` with ``key=fold_in(key, epoch)``, cut into
    ``S = ceil(n / B)`` batches. The plan has ``S' = ceil(padded_rows(n) / B) >= S`` rows so that
    its shape, too, depends on the bucketed size only; rows past ``S`` are never used. Padding
    entries point at row 0 (finite inputs) and are invalid.
    """
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n), np.int32)
    rows = -(-_padded_rows(n) // batch_size) * batch_size
    idx = np.zeros((rows,), np.int32)
    idx[:n] = perm
    valid = np.arange(rows) < n
    return idx.reshape(-1, batch_size), valid.reshape(-1, batch_size)


def _take_batch(data, idx_row, valid_row):
    batch = {k: jnp.take(v, idx_row, axis=0) for k, v in data.items()}
    if "id" in batch:
        batch["id"] = jnp.where(valid_row, batch["id"], -1)
    return batch


def _step(
    state, acc, data, weights, idx, valid, step, *, task, regularizer, many, batch_sharding=None
):
    """One optimizer step on batch ``step`` of the epoch plan; ``many`` vmaps over a model axis.

    ``acc`` accumulates the epoch's statistics on the device (so the host syncs once per epoch):
    the weighted loss sum, the weight total, the regularizer sum and the first step whose loss,
    regularizer or gradient was not finite (-1 while none). Under a mesh, ``batch_sharding`` splits
    the gathered batch ``[B, ...]`` over the batch axes, so that each device works on its own rows.
    """
    idx_row, valid_row = idx[step], valid[step]
    batch = _take_batch(data, idx_row, valid_row)
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)

    def one(state, acc, weights):
        mask = jnp.where(valid_row, jnp.take(weights, idx_row), jnp.zeros((), weights.dtype))
        count = jnp.sum(mask)

        def objective(params):
            losses = task.batch_losses(params, batch)
            # A weighted mean; a batch without members (count 0) is skipped below.
            data_loss = jnp.sum(mask * losses) / jnp.where(count > 0, count, 1.0)
            if regularizer is None:
                reg = jnp.zeros((), data_loss.dtype)
            else:
                reg = regularizer(params, batch, mask)
                _validate.scalar_output(reg, "regularizer(params, batch, mask)")
            return data_loss + reg, (data_loss, reg)

        (_, (data_loss, reg)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updated = state.apply_gradients(grads=grads)
        # A batch without members (member masks only) is no step at all.
        has_members = count > 0
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(has_members, a, b), updated, state)
        grads_finite = [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]
        finite = jnp.isfinite(data_loss) & jnp.isfinite(reg) & jnp.all(jnp.stack(grads_finite))
        first_bad = jnp.where((acc["first_bad"] < 0) & ~finite, step, acc["first_bad"])
        acc = {
            "loss_sum": acc["loss_sum"] + data_loss * count,
            "count": acc["count"] + count,
            "reg_sum": acc["reg_sum"] + reg.astype(acc["reg_sum"].dtype),
            "first_bad": first_bad.astype(acc["first_bad"].dtype),
        }
        return new, acc

    if many:
        return jax.vmap(one)(state, acc, weights)
    return one(state, acc, weights)


_train_step = jax.jit(_step, static_argnames=("task", "regularizer", "many"))


@functools.lru_cache(maxsize=64)
def _sharded_train_step(task: Task, regularizer: Any, many: bool, shardings: Frozen) -> Callable:
    """:func:`_step` jitted for a mesh, once per task, regularizer, model axis and shardings.

    ``shardings`` is ``(state, batch, replicated, data)``. The state goes in and comes out with the
    shardings the rules give it (the invariant optax keeps) and is donated; ``data`` is the device
    copy of the data set (replicated) or a streamed batch (split over the batch axes); the member
    weights, the epoch plan and the statistics are replicated.
    """
    state_sh, batch_sh, replicated, data_sh = shardings.tree
    step = functools.partial(
        _step, task=task, regularizer=regularizer, many=many, batch_sharding=batch_sh
    )
    return jax.jit(
        step,
        in_shardings=(state_sh, replicated, data_sh, *(replicated,) * 4),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )


def _zero_acc(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    zeros = np.zeros(shape, np.float32)
    return {
        "loss_sum": zeros,
        "count": zeros,
        "reg_sum": zeros,
        "first_bad": np.full(shape, -1, np.int32),
    }


@functools.partial(jax.jit, static_argnames=("task", "chunk", "many"))
def _eval_chunk(params, data, weights, start, *, task, chunk, many):
    """Weighted sums over rows ``[start, start + chunk)``: loss, metric (correct or squared error)."""
    n = data["x"].shape[0]
    rows = start + jnp.arange(chunk)
    valid = rows < n
    rows = jnp.minimum(rows, n - 1)
    batch = {k: jnp.take(v, rows, axis=0) for k, v in data.items()}

    def one(params, weights):
        w = jnp.where(valid, jnp.take(weights, rows), jnp.zeros((), weights.dtype))
        outputs = task.batch_outputs(params, batch)
        losses = task.output_losses(outputs, batch["y"], batch.get("weights"))
        if task.kind == CLASSIFICATION:
            metric = (jnp.argmax(outputs, axis=-1) == batch["y"]).astype(losses.dtype)
        elif task.kind == SEQUENCE:
            metric = _token_accuracy(outputs, batch["y"], batch.get("weights"))
        else:
            err = jnp.square(outputs - batch["y"].reshape(outputs.shape))
            metric = jnp.mean(err.reshape(chunk, -1), axis=-1)
        return jnp.stack([jnp.sum(w * losses), jnp.sum(w * metric), jnp.sum(w)])

    if many:
        return jax.vmap(one)(params, weights)
    return one(params, weights)


def _token_accuracy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None) -> jax.Array:
    r"""Per-sequence weighted next-token accuracy ``[B]``:
    :math:`\sum_t w_t [\arg\max_v z_{tv} = y_t] / \sum_t w_t` (every position when ``weights`` is
    ``None``; 0 for a row without weighted tokens).

    Shapes: ``logits [B, T, V]``, ``targets [B, T]``, ``weights [B, T]``.
    """
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(logits.dtype)
    if weights is None:
        return jnp.mean(hits, axis=-1)
    weights = weights.astype(logits.dtype)
    total = jnp.sum(weights, axis=-1)
    return jnp.sum(weights * hits, axis=-1) / jnp.where(total > 0, total, 1.0)


# ---- input checks --------------------------------------------------------------------------------
def _check_dataset(ds: Any, name: str) -> None:
    for attr in ("x", "y", "ids"):
        if not hasattr(ds, attr):
            raise TypeError(
                f"{name} must be an unlearn_jax.data.Dataset (with x, y, ids), got {type(ds).__name__}."
            )
    if len(ds.ids) == 0:
        raise ValueError(
            f"{name} ({getattr(ds, 'name', '') or 'dataset'}) is empty; nothing to train on."
        )
    sizes = {"x": np.shape(ds.x)[0], "y": np.shape(ds.y)[0], "ids": np.shape(ds.ids)[0]}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name}: x, y and ids disagree on the number of examples: {sizes}.")


def _check_task_data(task: Task, params: Any, ds: Any, name: str) -> None:
    """Static checks that the task's outputs fit the dataset's targets (labels < K, target sizes)."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be an unlearn_jax.Task, got {type(task).__name__}.")
    ds_kind = getattr(ds, "kind", None)
    if ds_kind is not None and ds_kind != task.kind:
        raise ValueError(
            f"the task is {task.kind} but {name} ({getattr(ds, 'name', '')!r}) is {ds_kind}; build the "
            f"task with kind={ds_kind!r}."
        )
    out = jax.eval_shape(
        task.apply, params, jax.ShapeDtypeStruct((1, *np.shape(ds.x)[1:]), ds.x.dtype)
    )
    if task.kind == SEQUENCE:
        _check_sequence_data(out.shape, ds, name)
        return
    if len(out.shape) != 2:
        raise ValueError(
            f"task.apply must return outputs [B, K], got shape {out.shape} for a batch of 1."
        )
    k = out.shape[1]
    y = np.asarray(ds.y)
    if task.kind == CLASSIFICATION:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"classification needs integer labels, but {name}.y has dtype {y.dtype}."
            )
        hi, lo = int(y.max()), int(y.min())
        if lo < 0 or hi >= k:
            raise ValueError(
                f"{name} has labels in [{lo}, {hi}] but the model has {k} outputs; labels must lie in "
                f"[0, {k}). Set num_outputs to the number of classes."
            )
    elif int(np.prod(y.shape[1:], dtype=np.int64)) != k:
        raise ValueError(
            f"{name} has regression targets of shape {y.shape[1:]} per example but the model has {k} "
            "outputs; they must have the same size."
        )


def _check_sequence_data(out_shape: tuple[int, ...], ds: Any, name: str) -> None:
    """A sequence model's logits ``[1, T, V]`` against next tokens ``y [N, T]`` in ``[0, V)`` and
    token weights ``[N, T]`` (the answer tokens the loss counts)."""
    x_shape = tuple(np.shape(ds.x))
    if len(out_shape) != 3 or out_shape[:2] != (1, x_shape[1] if len(x_shape) > 1 else -1):
        raise ValueError(
            f"a sequence task.apply must return logits [B, T, V] for tokens [B, T]; got shape "
            f"{out_shape} for {name}'s inputs of shape (1, {', '.join(map(str, x_shape[1:]))})."
        )
    vocab = out_shape[2]
    y = np.asarray(ds.y)
    if y.shape != x_shape or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{name} must hold next-token targets y of the shape of x {x_shape} as integers, got "
            f"dtype {y.dtype} shape {y.shape}."
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) >= vocab):
        raise ValueError(
            f"{name} has target tokens in [{int(y.min())}, {int(y.max())}] but the model's "
            f"vocabulary has {vocab} tokens; set num_outputs to the vocabulary size."
        )
    weights = getattr(ds, "weights", None)
    if weights is None:
        raise ValueError(
            f"{name} has no token weights; a sequence task trains on the weighted (answer) tokens: "
            "build the Dataset with weights [N, T] (e.g. unlearn_jax.data.facts.encode_qa's)."
        )
    if np.shape(weights) != x_shape:
        raise ValueError(
            f"{name}.weights must have the shape of x {x_shape}, got {np.shape(weights)}."
        )


def _member_weights(mask: Any, n: int, rows: int | None, name: str) -> np.ndarray:
    """Validates a member mask ``[N]`` (or ``[M, N]`` when ``rows`` is given) into float32 weights."""
    expected = (n,) if rows is None else (rows, n)
    if mask is None:
        return np.ones(expected, np.float32)
    w = np.asarray(mask)
    if w.shape != expected:
        raise ValueError(
            f"{name} must have shape {expected} (one weight per training example), got {w.shape}."
        )
    if not (w.dtype == np.bool_ or np.issubdtype(w.dtype, np.number)):
        raise ValueError(f"{name} must be boolean or numeric, got dtype {w.dtype}.")
    w = w.astype(np.float32)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{name} must hold finite weights >= 0 (1 = member, 0 = non-member).")
    totals = w.reshape(-1, n).sum(axis=1)
    if np.any(totals == 0):
        which = np.flatnonzero(totals == 0).tolist()
        where = f" (rows {which})" if rows is not None else ""
        raise ValueError(f"{name} selects no training example{where}; every model needs members.")
    return w


def _check_key(key: Any, name: str, *, batched: bool) -> int | None:
    arr = key
    if not isinstance(arr, jax.Array):
        raise TypeError(
            f"{name} must be a JAX PRNG key (jax.random.key(0)), got {type(key).__name__}."
        )
    typed = jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key)
    base_ndim = 0 if typed else 1
    want = base_ndim + (1 if batched else 0)
    if arr.ndim != want or (not typed and arr.shape[-1] != 2):
        what = "a stack of keys [M]" if batched else "a single key"
        raise ValueError(
            f"{name} must be {what} (from jax.random.key / jax.random.split), got shape {arr.shape} "
            f"dtype {arr.dtype}."
        )
    if batched:
        if arr.shape[0] == 0:
            raise ValueError(f"{name} is empty; pass at least one key (one per model).")
        return int(arr.shape[0])
    return None


# ---- the training loop shared by fit and fit_many -------------------------------------------------
class _EvalData(NamedTuple):
    data: dict[str, jax.Array] | None  # the device copy; None for a streamed data set
    weights: Any  # [..., padded rows] on the device, or [..., N] on the host when streamed
    chunk: int
    streamed: StreamedDataset | None = None
    sharding: jax.sharding.Sharding | None = None


def _upload(ds: Any, batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """A host batch read from ``ds`` on the device, in its stored dtypes, inputs made float32 there."""
    put = functools.partial(jax.device_put, device=sharding)
    return to_device(batch, x_divisor=getattr(ds, "x_divisor", None), put=put)


def _eval_data(
    ds: Any, weights: np.ndarray, eval_batch_size: int, device=None, sharding=None
) -> _EvalData:
    if isinstance(ds, StreamedDataset):
        chunk = min(eval_batch_size, _padded_rows(len(ds.ids)))
        return _EvalData(None, weights, chunk, ds, sharding)
    data, weights_dev = _device_data(ds, weights, sharding) if device is None else device
    rows = data["x"].shape[0]
    return _EvalData(data, weights_dev, min(eval_batch_size, rows))


def _eval_chunks(ev: _EvalData):
    """``(data, weights, start)`` of each chunk: slices of the device copy, or streamed chunks of
    ``chunk`` rows (the last padded with weight-0 rows) read ahead by a background thread."""
    if ev.streamed is None:
        for start in range(0, ev.data["x"].shape[0], ev.chunk):
            yield ev.data, ev.weights, start
        return
    n = len(ev.streamed.ids)

    def read(start):
        positions = np.arange(start, min(start + ev.chunk, n))
        batch, _ = pad_rows(read_rows(ev.streamed, positions), ev.chunk)
        weights = np.zeros((*ev.weights.shape[:-1], ev.chunk), np.float32)
        weights[..., : len(positions)] = ev.weights[..., positions]
        return _upload(ev.streamed, batch, ev.sharding), jax.device_put(weights, ev.sharding)

    for data, weights in prefetched(read, range(0, n, ev.chunk), ev.streamed.prefetch):
        yield data, weights, 0


def _evaluate(
    task: Task, params: Any, ev: _EvalData, *, many: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean loss and metric (accuracy or MSE); ``[M]`` arrays when ``many``, else scalars."""
    total = None
    for data, weights, start in _eval_chunks(ev):
        sums = _eval_chunk(params, data, weights, start, task=task, chunk=ev.chunk, many=many)
        total = sums if total is None else total + sums
    total = np.asarray(total, np.float64)
    return total[..., 0] / total[..., 2], total[..., 1] / total[..., 2]


def _progress_enabled(progress: bool | None) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def _train(
    state: TrainState,
    task: Task,
    train: Any,
    weights: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    test: Any,
    regularizer: Regularizer | None,
    progress: bool | None,
    eval_batch_size: int,
    many: bool,
    placement: Placement | None = None,
) -> tuple[TrainState, dict[str, list]]:
    n = len(train.ids)
    batch_size = min(batch_size, n)
    steps = -(-n // batch_size)
    replicated = None if placement is None else placement.replicated()
    streamed = isinstance(train, StreamedDataset)
    if streamed:  # batches read and uploaded step by step; no copy of the data set on the device
        data = weights_dev = None
        train_eval = _eval_data(train, weights, eval_batch_size, sharding=replicated)
    else:
        data, weights_dev = _device_data(train, weights, replicated)
        train_eval = _eval_data(train, weights, eval_batch_size, device=(data, weights_dev))
    test_eval = None
    if test is not None:
        test_w = np.ones(
            (_n_models(weights), len(test.ids)) if many else (len(test.ids),), np.float32
        )
        test_eval = _eval_data(test, test_w, eval_batch_size, sharding=replicated)
    if placement is None:
        train_step = functools.partial(_train_step, task=task, regularizer=regularizer, many=many)
        rows, data_sharding = batch_size, None
    else:
        # The state on the mesh with the rules' shardings, in fresh buffers: the step donates it,
        # and the caller's arrays must survive (device_put would return an array placed as is).
        state = jax.device_put(state, placement.of(state), may_alias=False)
        data_sharding = placement.batch() if streamed else replicated
        shardings = Frozen((placement.of(state), placement.batch(), replicated, data_sharding))
        train_step = _sharded_train_step(task, regularizer, many, shardings)
        # Each batch is split over the batch axes: its rows padded (weight 0) to a multiple.
        multiple = placement.batch_size_multiple
        rows = -(-batch_size // multiple) * multiple

    metric = _METRICS[task.kind]
    history: dict[str, list] = {"loss": [], f"train_{metric}": []}
    if regularizer is not None:
        history["regularizer"] = []
    if test is not None:
        history[f"test_{metric}"] = []

    bar = tqdm.tqdm(
        total=epochs * steps,
        unit="step",
        desc=f"fit {getattr(train, 'name', '') or 'train'}"
        + (f" x{_n_models(weights)}" if many else ""),
        disable=not _progress_enabled(progress),
        leave=False,
        file=sys.stderr,
    )
    with bar:
        for epoch in range(epochs):
            idx, valid = _epoch_plan(key, epoch, n=n, batch_size=batch_size)
            if rows > batch_size:  # padding columns: row 0, invalid (weight 0, id -1)
                idx = np.pad(idx, ((0, 0), (0, rows - batch_size)))
                valid = np.pad(valid, ((0, 0), (0, rows - batch_size)))
            acc = _zero_acc((_n_models(weights),) if many else ())
            if placement is not None:  # as the step returns it (else the first call traces twice)
                acc = jax.device_put(acc, replicated)
            if streamed:
                # Batch s holds rows idx[s] in order: the step gathers positions 0..B-1 of it.
                local = np.broadcast_to(np.arange(rows, dtype=np.int32), idx.shape)
                local, valid_dev = jax.device_put((np.array(local), valid), replicated)

                def read(s, idx=idx):
                    batch = _upload(train, read_rows(train, idx[s]), data_sharding)
                    return batch, jax.device_put(weights[..., idx[s]], replicated)

                batches = prefetched(read, range(steps), train.prefetch)
                for s, (batch, batch_weights) in enumerate(batches):
                    state, acc = train_step(state, acc, batch, batch_weights, local, valid_dev, s)
                    bar.update(1)
            else:
                idx, valid = jax.device_put((idx, valid), replicated)
                for s in range(steps):
                    state, acc = train_step(state, acc, data, weights_dev, idx, valid, s)
                    bar.update(1)
            # One transfer per epoch; the steps above were dispatched without waiting.
            acc = jax.device_get(acc)
            _raise_if_not_finite(acc["first_bad"], epoch, epochs, steps, many)
            history["loss"].append(acc["loss_sum"].astype(np.float64) / acc["count"])
            if regularizer is not None:
                history["regularizer"].append(acc["reg_sum"].astype(np.float64) / steps)
            train_loss, train_metric = _evaluate(task, state.params, train_eval, many=many)
            if not np.all(np.isfinite(train_loss)):
                raise FloatingPointError(
                    f"the parameters became NaN or infinite at the end of epoch {epoch + 1}/{epochs} "
                    "(every step's loss and gradient were finite, but the training loss of the "
                    "updated parameters is not); lower the learning rate or clip the gradients."
                )
            history[f"train_{metric}"].append(train_metric)
            if test_eval is not None:
                history[f"test_{metric}"].append(
                    _evaluate(task, state.params, test_eval, many=many)[1]
                )
            shown = {k: float(np.mean(v[-1])) for k, v in history.items()}
            bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
    return state, history


def _n_models(weights: np.ndarray) -> int:
    return int(weights.shape[0])


def _raise_if_not_finite(first_bad: np.ndarray, epoch: int, epochs: int, steps: int, many: bool):
    bad = np.flatnonzero(np.reshape(first_bad, -1) >= 0)
    if bad.size == 0:
        return
    model = int(bad[0])
    step = int(np.reshape(first_bad, -1)[model])
    which = f" of model {model}" if many else ""
    raise FloatingPointError(
        f"non-finite training loss, regularizer or gradient{which} at epoch {epoch + 1}/{epochs}, "
        f"step {step + 1}/{steps}. Lower the learning rate, clip the gradients, or check the "
        "regularizer."
    )


def _check_finite_params(params: Any) -> None:
    # On the host: jnp.isfinite here would compile one small program per leaf shape.
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"state.params{jax.tree_util.keystr(path)} contains NaN or infinite values; fit needs "
                "finite initial parameters."
            )


def _validate_fit_args(epochs, batch_size, eval_batch_size, regularizer, progress) -> None:
    _validate.positive_int(epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size)
    if regularizer is not None and not callable(regularizer):
        raise TypeError(
            f"regularizer must be callable (params, batch, mask) -> scalar, got {regularizer!r}."
        )
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (auto), got {progress!r}.")


# ---- public training functions -------------------------------------------------------------------
def fit(
    state: TrainState,
    task: Task,
    train: Any,
    *,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    test: Any = None,
    regularizer: Regularizer | None = None,
    member_mask: Any = None,
    progress: bool | None = None,
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
    logical: Any = None,
) -> tuple[TrainState, History]:
    r"""Trains ``state`` on ``train`` for ``epochs`` epochs of mini-batch steps.

    The recipe (see the module docstring): each epoch shuffles with ``fold_in(key, epoch)`` and
    takes ``ceil(N / B)`` steps on the masked objective

    .. math:: L(\theta) = \frac{\sum_i m_i \ell_i(\theta)}{\sum_i m_i} + R(\theta; \text{batch}, m),

    one compiled step for every batch (the last, partial one is padded with weight-0 rows). With
    ``B >= N`` every epoch is one full-batch step (``B`` is clamped to ``N``).

    Args:
      state: the ``TrainState`` to train (e.g. from :func:`create_train_state`).
      task: the :class:`~unlearn_jax.Task` giving outputs and per-example losses.
      train: an :class:`unlearn_jax.data.Dataset` with ``N >= 1`` examples, or a
        :class:`unlearn_jax.data.StreamedDataset`: then no copy of the data set goes to the device;
        each step's ``B`` records are read (a background thread reading ahead ``train.prefetch``
        batches), uploaded in their stored dtype (split over the batch axes under a mesh) and made
        float32 there, and the per-epoch evaluation streams the same way. The batches and the
        result are those of the in-memory fit. Label checks read every label once (targets of a
        sequence set included).
      epochs: number of passes over the data, >= 1.
      batch_size: ``B``, rows per step, >= 1.
      key: PRNG key of the batch order (the only randomness in training).
      test: optional held-out ``Dataset`` evaluated after every epoch.
      regularizer: optional ``R(params, batch, mask) -> scalar`` added to the mean loss. ``batch`` is
        the padded batch ``{"x": [B, ...], "y": [B], "id": [B]}`` (plus ``"weights" [B, T]`` for a
        sequence dataset; padding rows have id -1) and
        ``mask [B]`` float32 the per-row weights ``m_i`` (0 on padding rows), which ``R`` must respect.
        ``R`` may itself call ``jax.grad`` (e.g. a gradient-norm penalty): the step differentiates
        through it (double backpropagation).
      member_mask: optional ``[N]`` weights ``w_i >= 0`` (bool or 0/1 for membership) in dataset row
        order; ``m_i = w_i`` on real rows. Non-members (``w_i = 0``) have no influence on training.
        ``None`` means all ones, and gives exactly the same result as an all-ones mask.
      progress: show a tqdm bar on stderr: ``None`` (default) only if stderr is a terminal.
      eval_batch_size: rows per forward pass of the per-epoch evaluation.
      mesh: a ``jax.sharding.Mesh`` (axes among ``data``, ``fsdp``, ``tensor``) to train on. The
        state (parameters and optimizer state) is placed with the shardings ``rules`` give its
        shapes, and every step is jitted with those shardings in and out (so a step never moves
        the state) and donates it; each batch is split over the mesh's batch axes (``data`` and
        ``fsdp``), its ``B`` rows padded with weight-0 rows to a multiple of their device count
        (the loss and gradient do not change: padding rows have ``m_i = 0``). The device copy of
        the data set is replicated. ``None`` (default): no mesh, the single-device path.
      rules: :class:`~unlearn_jax.sharding.ShardingRules` for ``mesh`` (default
        :data:`~unlearn_jax.sharding.DEFAULT_RULES`); only with ``mesh``.
      logical: the parameters' logical axis names, ``unlearn_jax.sharding.logical_axes(
        jax.eval_shape(model.init, key, x))``, for models annotated with Flax logical partitioning
        (the transformer); only with ``mesh``.

    Returns:
      ``(state, history)``: the trained state and per-epoch metrics, each a list of ``epochs``
      floats: ``"loss"`` (mean training loss over the epoch's steps, weighted by ``m``; the
      regularizer excluded), ``"train_acc"`` and ``"test_acc"`` (classification; accuracy of the
      end-of-epoch parameters over the members, resp. the test set) or ``"train_mse"`` and
      ``"test_mse"`` (regression; mean over examples and outputs of the squared error) or
      ``"train_token_acc"`` and ``"test_token_acc"`` (sequence; mean over sequences of the weighted
      next-token accuracy on the answer tokens), and ``"regularizer"`` (mean over steps) when one
      is given. ``test_*`` only with ``test``.

    Sequence tasks. A sequence dataset (token ``weights [N, T]``, e.g. :func:`unlearn_jax.data.load`
    ``("facts")``) trains on :math:`\ell_i = -\sum_t w_{it} \log p_\theta(y_{it} | x_{i, \le t})`:
    only the answer tokens count, summed per sequence, then averaged over the batch's rows as above.

    Raises:
      ValueError: empty data, labels outside ``[0, K)`` (target tokens outside the vocabulary),
        a sequence dataset without token weights, task kind not matching the data, bad mask or
        hyper-parameters, ``rules`` or ``logical`` without ``mesh``.
      TypeError: a regularizer returning a non-scalar, a non-Task task, a ``mesh`` that is not a
        ``jax.sharding.Mesh``.
      FloatingPointError: a non-finite loss (the message gives the epoch and step) or parameters.

    Guarantees:
      Under a mesh the result equals the unsharded one up to float32 reassociation (the same sums
      over another split of the rows); the returned state has the shardings the rules give it.

    Examples:
      >>> import optax
      >>> from unlearn_jax.data import load
      >>> from unlearn_jax.models import get_model, model_task
      >>> splits = load("digits")
      >>> model = get_model("linear", num_outputs=10)
      >>> state = create_train_state(model, splits.train.x[:1], optax.adam(1e-2), jax.random.key(0))
      >>> state, history = fit(state, model_task(model), splits.train, epochs=3, batch_size=64,
      ...                      key=jax.random.key(1), test=splits.test, progress=False)
      >>> sorted(history), len(history["loss"]), round(history["test_acc"][-1], 2)
      (['loss', 'test_acc', 'train_acc'], 3, 0.89)
    """
    _validate_fit_args(epochs, batch_size, eval_batch_size, regularizer, progress)
    placement = make_placement(mesh, rules, logical)
    _check_key(key, "key", batched=False)
    _check_dataset(train, "train")
    if test is not None:
        _check_dataset(test, "test")
    _check_task_data(task, state.params, train, "train")
    if test is not None:
        _check_task_data(task, state.params, test, "test")
    weights = _member_weights(member_mask, len(train.ids), None, "member_mask")
    _check_finite_params(state.params)
    state = state.replace(step=jnp.asarray(np.asarray(state.step, np.int32)))
    state, history = _train(
        state,
        task,
        train,
        weights,
        epochs=epochs,
        batch_size=batch_size,
        key=key,
        test=test,
        regularizer=regularizer,
        progress=progress,
        eval_batch_size=eval_batch_size,
        many=False,
        placement=placement,
    )
    return state, {k: [float(v) for v in vs] for k, vs in history.items()}


def fit_many(
    model: Any,
    task: Task,
    sample_input: Any,
    optimizer: optax.GradientTransformation,
    train: Any,
    *,
    keys: jax.Array,
    epochs: int,
    batch_size: int,
    data_key: jax.Array,
    member_masks: Any = None,
    test: Any = None,
    regularizer: Regularizer | None = None,
    progress: bool | None = None,
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
    logical: Any = None,
) -> tuple[TrainState, dict[str, np.ndarray]]:
    r"""Trains ``M = len(keys)`` models as one vectorised computation (``vmap`` over a model axis).

    Model ``j`` is initialised from ``keys[j]`` and trained with :func:`fit`'s recipe on ``train``
    with member weights ``member_masks[j]``; all models share the batch order drawn from
    ``data_key``. Up to floating-point reassociation in the batched kernels this equals

    .. code-block:: python

        for j in range(M):
            fit(create_train_state(model, sample_input, optimizer, keys[j]), task, train,
                key=data_key, member_mask=member_masks[j], ...)

    which is how shadow models for membership inference (each trained on its own random half of the
    data) or several seeds of a retrained oracle are trained in one pass.

    Args:
      model, sample_input, optimizer: as for :func:`create_train_state`.
      task, epochs, batch_size, test, regularizer, progress, eval_batch_size: as for :func:`fit`.
      train: the ``Dataset`` (or ``StreamedDataset``) of all candidate examples, ``N`` rows.
      keys: ``M`` PRNG keys, one per model (``jax.random.split(key, M)``).
      data_key: the PRNG key of the (shared) batch order.
      member_masks: optional ``[M, N]`` weights (bool or 0/1): row ``j`` selects model ``j``'s
        members; a non-member has weight 0 in that model's loss. ``None`` means all ones.
      mesh, rules, logical: as for :func:`fit`. The stacked state ``[M, ...]`` gets its shardings
        from the rules like :func:`unlearn_jax.methods.unlearn_many`'s (logical names apply to the
        trailing dimensions, so the model axis stays replicated unless FSDP's fallback finds it the
        largest divisible dimension), so the trained population feeds ``unlearn_many`` on the same
        mesh without a reshard; the shared batch is split over the batch axes for all models.

    Returns:
      ``(states, history)``: a ``TrainState`` whose every leaf has a leading model axis ``[M, ...]``
      (model ``j`` is ``jax.tree_util.tree_map(lambda a: a[j], states)``), and the history of
      :func:`fit` with each value an array ``[M, epochs]``. ``train_acc`` is over each model's
      members.

    Raises:
      As :func:`fit`; the NaN message names the model index.
    """
    _validate_fit_args(epochs, batch_size, eval_batch_size, regularizer, progress)
    placement = make_placement(mesh, rules, logical)
    m = _check_key(keys, "keys", batched=True)
    _check_key(data_key, "data_key", batched=False)
    _check_dataset(train, "train")
    if test is not None:
        _check_dataset(test, "test")
    weights = _member_weights(member_masks, len(train.ids), m, "member_masks")
    states = jax.vmap(lambda k: create_train_state(model, sample_input, optimizer, k))(keys)
    params0 = jax.tree_util.tree_map(lambda a: a[0], states.params)
    _check_task_data(task, params0, train, "train")
    if test is not None:
        _check_task_data(task, params0, test, "test")
    states, history = _train(
        states,
        task,
        train,
        weights,
        epochs=epochs,
        batch_size=batch_size,
        key=data_key,
        test=test,
        regularizer=regularizer,
        progress=progress,
        eval_batch_size=eval_batch_size,
        many=True,
        placement=placement,
    )
    return states, {k: np.stack(vs, axis=-1) for k, vs in history.items()}


def retrain(
    model: Any,
    task: Task,
    sample_input: Any,
    optimizer: optax.GradientTransformation,
    train: Any,
    forget_ids: Any,
    *,
    epochs: int,
    batch_size: int,
    init_key: jax.Array,
    data_key: jax.Array,
    test: Any = None,
    regularizer: Regularizer | None = None,
    progress: bool | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
    logical: Any = None,
) -> RetrainResult:
    r"""Exact unlearning by retraining from scratch on ``train`` without ``forget_ids``.

    The same recipe as the original training: ``create_train_state(model, sample_input, optimizer,
    init_key)`` then :func:`fit` with ``key=data_key`` on ``train.without_ids(forget_ids)``. With the
    keys of the original run, the only difference between the two is the absence of the forget set
    (the initial parameters are identical; the batch order is drawn for ``N - |forget|`` rows).

    Guarantees:
      Exact by construction: the returned model is a draw from the training distribution on the
      retain set, so it is the reference every approximate method is compared with.

    Args:
      model, sample_input, optimizer: as for :func:`create_train_state`.
      task, epochs, batch_size, test, regularizer, progress, mesh, rules, logical: as for
        :func:`fit` (the state is created on the default device, then placed on ``mesh``).
      train: the full training ``Dataset`` (or ``StreamedDataset``).
      forget_ids: ids to leave out (every one must be in ``train``; may be empty).
      init_key: PRNG key of the parameter initialisation.
      data_key: PRNG key of the batch order.

    Returns:
      :class:`RetrainResult` ``(state, history, wall_time, retained_ids)``; ``wall_time`` covers
      :func:`fit` including compilation, after ``block_until_ready``.

    Raises:
      ValueError: if a forget id is not in ``train``, or nothing would remain.
    """
    _check_dataset(train, "train")
    retain = train.without_ids(forget_ids)
    if len(retain.ids) == 0:
        raise ValueError(
            f"forget_ids remove all {len(train.ids)} examples of {train.name or 'train'}; nothing is "
            "left to retrain on."
        )
    state = create_train_state(model, sample_input, optimizer, init_key)
    start = time.perf_counter()
    state, history = fit(
        state,
        task,
        retain,
        epochs=epochs,
        batch_size=batch_size,
        key=data_key,
        test=test,
        regularizer=regularizer,
        progress=progress,
        mesh=mesh,
        rules=rules,
        logical=logical,
    )
    jax.block_until_ready(state)
    wall_time = time.perf_counter() - start
    return RetrainResult(state, history, wall_time, np.asarray(retain.ids, np.int64).copy())


def train_original(
    model: Any,
    task: Task,
    sample_input: Any,
    optimizer: optax.GradientTransformation,
    train: Any,
    *,
    epochs: int,
    batch_size: int,
    init_key: jax.Array,
    data_key: jax.Array,
    test: Any = None,
    regularizer: Regularizer | None = None,
    progress: bool | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules | None = None,
    logical: Any = None,
) -> RetrainResult:
    """Trains the original model on all of ``train``: :func:`retrain` with an empty forget set.

    Using this and :func:`retrain` with the same keys makes the original and the retrained oracle
    differ only by the forget set. ``retained_ids`` lists every training id.
    """
    return retrain(
        model,
        task,
        sample_input,
        optimizer,
        train,
        np.zeros((0,), np.int64),
        epochs=epochs,
        batch_size=batch_size,
        init_key=init_key,
        data_key=data_key,
        test=test,
        regularizer=regularizer,
        progress=progress,
        mesh=mesh,
        rules=rules,
        logical=logical,
    )


def evaluate_accuracy(
    task: Task, params: Any, dataset: Any, *, batch_size: int = DEFAULT_EVAL_BATCH_SIZE
) -> float:
    r"""Top-1 accuracy :math:`\frac1N \sum_i [\arg\max_k f(x_i)_k = y_i]` of ``params`` on ``dataset``.

    Evaluated in fixed-size chunks of ``batch_size`` rows (one compilation for any dataset size).

    Raises:
      ValueError: for a regression task, an empty dataset, or labels outside the model's outputs.
    """
    _validate.positive_int(batch_size=batch_size)
    if task.kind != CLASSIFICATION:
        raise ValueError("evaluate_accuracy needs a classification task; this one is regression.")
    _check_dataset(dataset, "dataset")
    _check_task_data(task, params, dataset, "dataset")
    ev = _eval_data(dataset, np.ones(len(dataset.ids), np.float32), batch_size)
    return float(_evaluate(task, params, ev, many=False)[1])


__all__ = [
    "RetrainResult",
    "TrainState",
    "create_train_state",
    "evaluate_accuracy",
    "fit",
    "fit_many",
    "retrain",
    "train_original",
]
