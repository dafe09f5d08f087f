r"""Unlearning by matching outputs: oracle matching (OM) and datamodel matching (DMM).

Both fine-tune the model so that its logits match per-example targets, with a squared error on the
logits, on the forget set and on retain examples in the proportion ``1 : retain_ratio``:

.. math:: L(\theta) = \frac{1}{1 + \rho}\Bigl(\frac{1}{|B_f|}\sum_{j \in B_f} e_j(\theta)
          + \frac{\rho}{|B_r|}\sum_{j \in B_r} e_j(\theta)\Bigr), \qquad
          e_j(\theta) = \frac1K \lVert z(x_j; \theta) - \hat z_j \rVert^2,

with :math:`B_f, B_r` this step's forget and retain batches (real rows only) and :math:`\rho` the
retain ratio (3 in the paper). The optimizer is Adam (``b1 = 0.9, b2 = 0.999, eps = 1e-8``) with
learning rate :math:`\eta\,\gamma^{e}` in epoch :math:`e` (the paper: :math:`\eta = 5 \cdot 10^{-4}`,
:math:`\gamma = 0.95`, 5 epochs, batches of 512).

* :func:`oracle_matching`: :math:`\hat z_j` are given logits, e.g. the mean logits of ``K``
  models retrained without the forget set: the upper bound the paper reports for matching.
* :func:`dmm`: :math:`\hat z_j = z(x_j; \theta_0) - c \sum_{i \in D_f} \beta_{i,j,:}`, the
  original model's logits minus the predicted effect of the forget set, from per-class datamodel
  scores :math:`\beta` (TRAK: :meth:`unlearn_jax.attribution.TRAK.scores` with
  ``per_class=True``, summed over the forget rows by
  :meth:`~unlearn_jax.attribution.ScoreStore.sum_rows`). The attribution is computed once per
  model; a request only sums rows of the stored scores.

How the paper's batches map onto the driver's. The paper shuffles :math:`D_f` with a random sample
of :math:`3|D_f|` retain examples and takes batches of 512 from the mix. Here every step takes one
forget batch and one retain batch of ``batch_size`` rows each (the driver's fixed-shape batches)
and weights them ``1 : retain_ratio`` as above, which is the paper's mix in expectation; an epoch
is one pass over the forget set, so ``batch_size = 128`` gives the paper's number of steps per
epoch (:math:`\lceil 4|D_f| / 512 \rceil`). The retain rows are fresh at every step (the driver's
walk through the retain set) rather than a fixed sample reused every epoch: the same proportions
with more distinct retain examples. Pass a sample as ``retain`` to fix it instead.

Targets are looked up by example id (``batch["id"]``) in a table sorted by id; they travel to
``init`` as a precomputed statistic (``feeds.statistics["targets"]``), so every request of the
same shape reuses one compiled ``update``, and :func:`~unlearn_jax.methods.unlearn_many` gets one
table per model (``models=M`` tiles it). A forget or retain example without a target is an error
before any step.

References:
  Georgiev, Rinberg, Park, Garg, Ilyas, Madry, Neel. Attribute-to-Delete: Machine Unlearning via
  Datamodel Matching. ICLR 2025 (arXiv:2410.23232).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate
from unlearn_jax.core.batch import row_mask
from unlearn_jax.core.reductions import Reduced
from unlearn_jax.core.task import CLASSIFICATION
from unlearn_jax.methods.protocol import (
    FORGET,
    RETAIN,
    Checks,
    Feeds,
    RunPlan,
    Statistic,
    Unlearner,
)

Params = Any
TARGETS = "targets"


class MatchingTargets(NamedTuple):
    """Per-example targets keyed by example id.

    Attributes:
      ids: ``[n]`` int32 example ids, sorted increasingly (``[M, n]`` for ``M`` models).
      outputs: ``[n, K]`` float32 target logits (OM) or predicted effects of the forget set (DMM)
        (``[M, n, K]``).
      scale: float32 scalar ``c`` of DMM, 0 for OM (``[M]``).
    """

    ids: Any
    outputs: Any
    scale: Any


def matching_targets(
    ids: Any, outputs: Any, *, scale: float = 0.0, models: int | None = None
) -> MatchingTargets:
    """A :class:`MatchingTargets` table (sorted by id; tiled to ``models`` copies when given).

    Args:
      ids: ``[n]`` unique example ids (``< 2**31``).
      outputs: ``[n, K]`` finite values, row ``i`` for ``ids[i]``.
      scale: DMM's ``c`` (0: the outputs are the targets themselves).
      models: ``M`` for :func:`~unlearn_jax.methods.unlearn_many`: every leaf gets a leading
        model axis of size ``M`` (the same table for every model).

    Raises:
      ValueError: ids that repeat or do not fit int32, outputs that are not ``[n, K]`` or not
        finite.
    """
    ids = np.asarray(ids)
    outputs = np.asarray(outputs, np.float32)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be [n] integers, got dtype {ids.dtype} shape {ids.shape}.")
    if outputs.ndim != 2 or outputs.shape[0] != ids.shape[0]:
        raise ValueError(
            f"outputs must be [n, K] with n = {ids.shape[0]} (one row per id), got {outputs.shape}."
        )
    if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
        raise ValueError("ids must lie in [0, 2**31) to match the batches' int32 'id'.")
    order = np.argsort(ids, kind="stable")
    ids = ids[order].astype(np.int32)
    if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
        raise ValueError(f"ids repeat (e.g. {ids[1:][ids[1:] == ids[:-1]][:5].tolist()}).")
    if not np.all(np.isfinite(outputs)):
        raise ValueError("outputs hold NaN or infinite values.")
    _validate.positive_int(models=models)
    table = MatchingTargets(jnp.asarray(ids), jnp.asarray(outputs[order]), jnp.float32(scale))
    if models is not None:
        table = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (models, *a.shape)), table)
    return table


def _as_targets(targets: Any, scale: float, models: int | None) -> MatchingTargets:
    if isinstance(targets, MatchingTargets):
        table = targets
    elif isinstance(targets, Mapping):
        table = matching_targets(targets["ids"], targets["outputs"])
    elif isinstance(targets, tuple) and len(targets) == 2:
        table = matching_targets(*targets)
    else:
        raise TypeError(
            "targets must be MatchingTargets, an (ids [n], outputs [n, K]) pair or a mapping with "
            f"'ids' and 'outputs'; got {type(targets).__name__}."
        )
    table = table._replace(scale=jnp.full(np.shape(table.scale), scale, jnp.float32))
    _validate.positive_int(models=models)
    if models is None:
        return table
    if np.ndim(table.ids) == 2:
        if np.shape(table.ids)[0] != models:
            raise ValueError(
                f"the targets hold {np.shape(table.ids)[0]} models' tables, but {models=}."
            )
        return table
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (models, *np.shape(a))), table)


class MatchingState(NamedTuple):
    """The method state of :func:`oracle_matching` and :func:`dmm`.

    Attributes:
      adam: the Adam moments (``optax.scale_by_adam``).
      ref_params: the parameters before unlearning (DMM's :math:`\\theta_0`), else ``None``.
      targets: the :class:`MatchingTargets` table.
      step: int32 updates done.
      plan: the run's :class:`~unlearn_jax.methods.protocol.RunPlan` (epochs for the decay).
    """

    adam: Any
    ref_params: Params
    targets: MatchingTargets
    step: jax.Array
    plan: RunPlan


def _lookup(table: MatchingTargets, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(rows [B, K], found [B])`` of the table for ``ids [B]``."""
    where = jnp.clip(jnp.searchsorted(table.ids, ids), 0, table.ids.shape[0] - 1)
    return table.outputs[where], table.ids[where] == ids


def _side_errors(task, params, state: MatchingState, batch):
    """``(sum of weighted errors, weight, missing)`` of one side's batch."""
    logits = task.batch_outputs(params, batch)
    values, found = _lookup(state.targets, batch["id"])
    if state.ref_params is not None:
        reference = jax.lax.stop_gradient(task.batch_outputs(state.ref_params, batch))
        values = reference - state.targets.scale * values
    errors = jnp.mean(jnp.square(logits - values.astype(logits.dtype)), axis=-1)
    mask = row_mask(batch, errors.dtype)
    weight = mask * found.astype(errors.dtype)
    missing = jnp.sum(mask * (1.0 - found.astype(errors.dtype)))
    return jnp.sum(weight * errors), jnp.sum(weight), missing


@functools.cache
def _functions(learning_rate: float, decay: float, retain_ratio: float, datamodel: bool):
    """``(init, update)`` for one setting, cached: every request reuses the compiled steps."""
    adam = optax.scale_by_adam()

    def init(task, params, key, stats, plan):
        del key
        if task.kind != CLASSIFICATION:
            raise ValueError(f"matching acts on a classifier's logits; the task is {task.kind!r}.")
        return MatchingState(
            adam=adam.init(params),
            ref_params=params if datamodel else None,
            targets=stats[TARGETS].value,
            step=jnp.zeros((), jnp.int32),
            plan=plan,
        )

    def update(task, params, state, forget_batch, retain_batch, key):
        del key

        def loss_fn(p):
            f_sum, f_weight, f_missing = _side_errors(task, p, state, forget_batch)
            forget_mse = f_sum / jnp.maximum(f_weight, 1.0)
            if retain_batch is None:
                return forget_mse, (forget_mse, jnp.nan, f_missing)
            r_sum, r_weight, r_missing = _side_errors(task, p, state, retain_batch)
            retain_mse = r_sum / jnp.maximum(r_weight, 1.0)
            loss = (forget_mse + retain_ratio * retain_mse) / (1.0 + retain_ratio)
            return loss, (forget_mse, retain_mse, f_missing + r_missing)

        (loss, (forget_mse, retain_mse, missing)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(params)
        direction, adam_state = adam.update(grads, state.adam, params)
        epoch = state.step // jnp.maximum(state.plan.forget_steps, 1)
        rate = learning_rate * jnp.power(jnp.float32(decay), epoch.astype(jnp.float32))
        new_params = jax.tree_util.tree_map(
            lambda p, d: p - (rate * d).astype(p.dtype), params, direction
        )
        metrics = {
            "loss": loss,
            "forget/mse": forget_mse,
            "retain/mse": jnp.asarray(retain_mse, jnp.float32),
            "targets/missing": missing,
            "learning_rate": rate,
        }
        return new_params, state._replace(adam=adam_state, step=state.step + 1), metrics

    return init, update


def _not_a_reduction(task):
    del task
    raise ValueError("the matching targets are given, not reduced from data.")


def _request_check(table_ids: np.ndarray, forget_ids: np.ndarray | None, name: str):
    def check(task, params, forget, retain):
        del task, params
        for side, data in (("forget", forget), ("retain", retain)):
            if data is None or len(data) == 0:
                continue
            known = np.isin(np.asarray(data.ids), table_ids)
            if not known.all():
                missing = np.asarray(data.ids)[~known]
                raise ValueError(
                    f"{name}: {missing.size} {side} examples have no target (e.g. ids "
                    f"{missing[:5].tolist()}); the targets cover {table_ids.size} ids. Compute "
                    "them for the whole training set."
                )
        if forget_ids is not None:
            given = np.unique(np.asarray(forget.ids))
            if given.shape != forget_ids.shape or not np.array_equal(given, forget_ids):
                raise ValueError(
                    f"{name}: the targets were predicted for a forget set of {forget_ids.size} "
                    f"examples, but this request forgets {given.size} other or different ones; "
                    "predict the targets for this forget set."
                )

    return check


def _matching(
    name: str,
    table: MatchingTargets,
    *,
    datamodel: bool,
    forget_ids: Any,
    learning_rate: float,
    epochs: float,
    decay: float,
    retain_ratio: float,
    hparams: dict,
) -> Unlearner:
    _validate.positive(learning_rate=learning_rate, epochs=epochs)
    _validate.in_interval("decay", decay, 0.0, 1.0, closed="right")
    _validate.non_negative(retain_ratio=retain_ratio)
    init, update = _functions(float(learning_rate), float(decay), float(retain_ratio), datamodel)
    # Reduced.count carries the model axis too: unlearn_many vmaps init over every statistic leaf.
    count = jnp.full(np.shape(table.ids)[:-1], np.shape(table.ids)[-1], jnp.float32)
    value = Reduced(table, count)
    batches = (FORGET, RETAIN) if retain_ratio > 0 else (FORGET,)
    ids = np.unique(np.asarray(table.ids).reshape(-1))
    wanted = None if forget_ids is None else np.unique(np.asarray(forget_ids, np.int64))
    return Unlearner(
        init=init,
        update=update,
        name=name,
        feeds=Feeds(
            batches=batches,
            phases=((FORGET, None),),
            statistics={TARGETS: Statistic(_not_a_reduction, FORGET, value=value)},
            run={"epochs": float(epochs)},
        ),
        guarantee="approximate",
        hparams={
            "learning_rate": learning_rate,
            "epochs": epochs,
            "decay": decay,
            "retain_ratio": retain_ratio,
            "optimizer": "adam",
            **hparams,
        },
        checks=Checks(request=_request_check(ids, wanted, name)),
    )


def oracle_matching(
    targets: Any,
    *,
    learning_rate: float = 5e-4,
    epochs: float = 5,
    decay: float = 0.95,
    retain_ratio: float = 3.0,
    models: int | None = None,
) -> Unlearner:
    r"""Oracle matching: fine-tune the logits towards given targets (module docstring).

    Args:
      targets: :class:`MatchingTargets`, or ``(ids [n], logits [n, K])``: the logits to match for
        every forget and retain example (e.g. the mean logits of ``K`` models retrained without the
        forget set, on the whole training set).
      learning_rate: Adam's :math:`\eta` in the first epoch (5e-4).
      epochs: passes over the forget set (5).
      decay: :math:`\gamma`, the learning rate's factor per epoch (0.95).
      retain_ratio: :math:`\rho`, retain examples per forget example (3; 0: forget set only).
      models: for :func:`~unlearn_jax.methods.unlearn_many` over ``M`` models, ``M`` (the table
        is tiled); ``None`` for :func:`~unlearn_jax.methods.unlearn`.

    Returns:
      An :class:`~unlearn_jax.methods.protocol.Unlearner` that fixes its run (``epochs``); pass
      ``batch_size`` (128 gives the paper's steps per epoch) to ``unlearn``. Metrics: ``loss``,
      ``forget/mse``, ``retain/mse``, ``targets/missing`` (0), ``learning_rate``.

    Guarantees:
      Approximate: it moves the outputs on the matched examples towards the targets; with
      oracle targets it approaches retraining as far as the fine-tuning reaches them.

    Raises:
      ValueError: malformed targets or hyper-parameters; at ``unlearn``, a forget or retain example
        without a target.

    References:
      Georgiev et al. Attribute-to-Delete: Machine Unlearning via Datamodel Matching. ICLR 2025.
    """
    table = _as_targets(targets, 0.0, models)
    return _matching(
        "oracle_matching",
        table,
        datamodel=False,
        forget_ids=None,
        learning_rate=learning_rate,
        epochs=epochs,
        decay=decay,
        retain_ratio=retain_ratio,
        hparams={"targets": "given"},
    )


def dmm(
    effects: Any,
    *,
    forget_ids: Any = None,
    scale: float = 1.0,
    learning_rate: float = 5e-4,
    epochs: float = 5,
    decay: float = 0.95,
    retain_ratio: float = 3.0,
    models: int | None = None,
) -> Unlearner:
    r"""Datamodel matching: match :math:`z(x_j;\theta_0) - c \sum_{i \in D_f} \beta_{i,j,:}`.

    Args:
      effects: :class:`MatchingTargets` or ``(ids [n], effects [n, K])``: for every forget and
        retain example ``j``, the per-class datamodel prediction of the forget set's effect on its
        logits, :math:`\sum_{i \in D_f} \beta_{i,j,:}` (``store.sum_rows(forget.ids)`` of a
        per-class :class:`~unlearn_jax.attribution.ScoreStore` whose queries are the training
        set).
      forget_ids: the forget set the effects were predicted for; ``unlearn`` then refuses another
        request (``None``: not checked).
      scale: :math:`c` (1 in the paper).
      learning_rate, epochs, decay, retain_ratio, models: as for :func:`oracle_matching`.

    Returns:
      An :class:`~unlearn_jax.methods.protocol.Unlearner`; the original logits
      :math:`z(x_j; \theta_0)` come from a frozen copy of the parameters it starts from.

    Guarantees:
      Approximate; its quality follows the attribution's (LDS) and the matching's.

    References:
      Georgiev et al. Attribute-to-Delete: Machine Unlearning via Datamodel Matching. ICLR 2025.
    """
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale=}.")
    table = _as_targets(effects, float(scale), models)
    return _matching(
        "dmm",
        table,
        datamodel=True,
        forget_ids=forget_ids,
        learning_rate=learning_rate,
        epochs=epochs,
        decay=decay,
        retain_ratio=retain_ratio,
        hparams={"scale": scale},
    )


__all__ = ["MatchingState", "MatchingTargets", "dmm", "matching_targets", "oracle_matching"]
