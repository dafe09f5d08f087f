r"""The unlearning-method protocol: a method is a pair of pure functions over pytrees.

Like optax's ``GradientTransformation``, a method is a NamedTuple of two pure functions, and whatever
it carries between steps (an optimizer state, a frozen reference, a saliency mask, a Fisher) lives in
its own ``method_state``, apart from the model's parameters::

    state = init(task, params, key, stats, plan)
    params, state, metrics = update(task, params, state, forget_batch, retain_batch, key)

* ``task`` (a :class:`~unlearn_jax.core.task.Task`, static under ``jit``) says how to read the model;
* ``params`` is the model's parameter pytree (arrays, or ``jax.ShapeDtypeStruct``\ s for ``init``:
  ``jax.eval_shape(functools.partial(method.init, task), params, key, stats, plan)`` gives the
  method state's shapes, from which shardings follow);
* ``stats`` is a dict of finalized :class:`~unlearn_jax.core.reductions.Reduced` statistics that the
  method declared in ``feeds.statistics`` (a Fisher, a mean gradient, ...), computed by streaming
  reductions over the data before the first step: no data set is ever uploaded whole;
* ``plan`` is a :class:`RunPlan` of int32 arrays (the run's length, the steps of one pass over each
  side, the data sizes): schedules read it and the step count kept in the method state, so one
  compiled ``update`` serves runs of any length and requests of any size;
* batches are dicts ``{"x", "y", "id", "mask"}`` of a fixed number of rows, padding rows having
  ``mask == 0`` (``None`` for a side the method does not read);
* ``metrics`` is a flat dict of scalars with slash-separated keys; ``"loss"``, when present, is
  checked for finiteness by the driver.

``update`` is pure, jittable and ``vmap``-able over stacked models: every method of the library,
one-shot ones included, runs as one ``vmap`` in :func:`~unlearn_jax.methods.driver.unlearn_many`.
What the driver must feed a method is declared in :class:`Feeds`; host bookkeeping (a head's learned
ids, a deletion record) lives outside, in ledgers updated from the results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from unlearn_jax import _validate
from unlearn_jax.core.reductions import Reduced, Reduction
from unlearn_jax.core.task import Task

Params = Any
MethodState = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Stats = Mapping[str, Reduced]

FORGET = "forget"
RETAIN = "retain"
TRAIN = "train"  # the training set: retain, then forget
SIDES = (FORGET, RETAIN)
SOURCES = (FORGET, RETAIN, TRAIN)
ORDERS = ("data", "by_class")
GUARANTEES = ("exact", "certified", "approximate")


class RunPlan(NamedTuple):
    """What a run looks like, as int32 scalars (traced: one compilation serves every run).

    Attributes:
      total_steps: the number of ``update`` calls of the run.
      forget_steps: steps of one pass over the forget set (``ceil(n_f / B)``).
      retain_steps: steps of one pass over the retain set (0 without retain data).
      forget_size: ``n_f``, the number of forget examples.
      retain_size: ``n_r`` (0 without retain data).
    """

    total_steps: jax.Array
    forget_steps: jax.Array
    retain_steps: jax.Array
    forget_size: jax.Array
    retain_size: jax.Array

    @classmethod
    def create(cls, total_steps=1, forget_steps=1, retain_steps=0, forget_size=1, retain_size=0):
        """A plan from Python ints (each becomes an int32 array)."""
        values = (total_steps, forget_steps, retain_steps, forget_size, retain_size)
        return cls(*(jnp.asarray(v, jnp.int32) for v in values))


class Statistic(NamedTuple):
    """A statistic a method needs before its first step: a reduction over one data source.

    Attributes:
      reduction: ``reduction(task) -> Reduction`` (a factory, since the loss comes from the task).
      over: ``"forget"``, ``"retain"`` or ``"train"`` (the retain set, then the forget set).
      batch_size: rows per batch of the pass (``None``: the run's batch size). Part of the
        definition for batch-dependent estimators (SSD's reference importances).
      order: ``"data"`` (each set in its own order) or ``"by_class"`` (each set stably sorted by
        label before the pass, as SSD's class-forgetting scripts build their retain set).
      value: a precomputed result (e.g. importances cached at training time): the driver passes it
        as it is instead of streaming over the data (for ``M`` models, with a leading model axis).
    """

    reduction: Callable[[Task], Reduction]
    over: str
    batch_size: int | None = None
    order: str = "data"
    value: Reduced | None = None


class Feeds(NamedTuple):
    """What the driver must feed a method, and how long its run is.

    Attributes:
      batches: the sides whose batches ``update`` reads (``()``: none; ``("forget", "retain")``).
      phases: the structure of one epoch as ``((side, epochs), ...)``: one pass of fixed-size
        batches over ``side`` for each phase still active (``epochs=None``: every epoch; ``k``: the
        first ``k`` epochs only). Most methods have one phase; SalUn and SCRUB alternate two.
      statistics: ``{name: Statistic}`` computed before ``init`` and passed to it as ``stats``.
      run: the method's own run length, ``{"steps": k}`` or ``{"epochs": e}`` (one-shot methods:
        ``{"steps": 1}``); ``None``: the caller chooses with ``steps=``/``epochs=``.
      batch_size: the method's own batch size for ``update``'s batches (``None``: the caller's).
    """

    batches: tuple[str, ...] = (FORGET,)
    phases: tuple[tuple[str, int | None], ...] = ((FORGET, None),)
    statistics: Mapping[str, Statistic] = {}
    run: Mapping[str, float] | None = None
    batch_size: int | None = None

    def sides(self) -> frozenset[str]:
        """Every data set the method reads: its batches' sides and the sources of the statistics
        it computes (a statistic given with a precomputed ``value`` reads nothing)."""
        sources = set(self.batches) | {s.over for s in self.statistics.values() if s.value is None}
        if TRAIN in sources:
            sources |= {FORGET, RETAIN}
        return frozenset(sources - {TRAIN})


class Checks(NamedTuple):
    """Host-side checks of a method, run by the driver on concrete values (never under ``jit``).

    Attributes:
      request: ``request(task, params, forget, retain) -> None``, first of all: checks the request
        against a ledger the method keeps on the host (e.g. that an analytic head learned every
        forget example, with the same features). ``params`` has a leading model axis in
        :func:`~unlearn_jax.methods.unlearn_many` (it is called once per model then).
      stats: ``stats(statistics) -> None``, once the statistics are computed, before ``init``:
        raises on statistics the method cannot use (NaN importances) and warns about settings that
        cannot work with them.
      result: ``result(method_state, metrics) -> None`` after the last step: e.g. raises when a
        solver the caller asked to be strict about did not converge.
    """

    request: Callable[[Task, Params, Any, Any], None] | None = None
    stats: Callable[[Stats], None] | None = None
    result: Callable[[MethodState, Metrics], None] | None = None


InitFn = Callable[[Task, Params, jax.Array, Stats, RunPlan], MethodState]
UpdateFn = Callable[
    [Task, Params, MethodState, Batch | None, Batch | None, jax.Array],
    tuple[Params, MethodState, Metrics],
]


class Unlearner(NamedTuple):
    """An unlearning method: ``init`` and ``update`` (module docstring) and what to feed them.

    Attributes:
      init: ``init(task, params, key, stats, plan) -> method_state``.
      update: ``update(task, params, method_state, forget_batch, retain_batch, key) ->
        (params, method_state, metrics)``.
      name: a short name for tables and records (``"npo"``, ``"sam+npo"``).
      feeds: a :class:`Feeds`.
      guarantee: ``"exact"`` (equals retraining, for what it claims), ``"certified"`` ((epsilon,
        delta)) or ``"approximate"``; recorded with every result and in the deletion ledger.
      hparams: the hyper-parameters, recorded with every result so a run can be repeated.
      recipe: for gradient methods, the public recipe they were built from (objective, optimizer,
        transform: :class:`~unlearn_jax.methods.gradient.GradientRecipe`), so that wrappers such as
        :func:`~unlearn_jax.methods.gradient.sam` can change how the gradient is taken; ``None``
        for other methods.
      checks: optional host-side :class:`Checks` the driver runs outside the pure path.
    """

    init: InitFn
    update: UpdateFn
    name: str
    feeds: Feeds = Feeds()
    guarantee: str = "approximate"
    hparams: Mapping[str, Any] = {}
    recipe: Any = None
    checks: Checks | None = None


def check_unlearner(method: Any) -> Unlearner:
    """Validates an :class:`Unlearner`'s declarations; returns it.

    Raises:
      TypeError: not an Unlearner, or ``init``/``update`` not callable.
      ValueError: unknown sides, sources, orders or guarantee; an invalid run length.
    """
    if not isinstance(method, Unlearner):
        raise TypeError(
            f"method must be an Unlearner (e.g. unlearn_jax.methods.npo()), got "
            f"{type(method).__name__}."
        )
    if not (callable(method.init) and callable(method.update)):
        raise TypeError(f"{method.name}: init and update must be callable.")
    feeds = method.feeds
    for side in feeds.batches:
        _validate.one_of(f"{method.name} batch side", side, SIDES)
    if not feeds.phases:
        raise ValueError(f"{method.name}: feeds.phases is empty; an epoch needs a phase.")
    for side, epochs in feeds.phases:
        _validate.one_of(f"{method.name} phase side", side, SIDES)
        _validate.positive_int(**{f"{method.name} phase epochs": epochs})
    if all(epochs is not None for _, epochs in feeds.phases):
        raise ValueError(
            f"{method.name}: at least one phase must run in every epoch (epochs=None); otherwise a "
            "run given in steps could run out of phases."
        )
    for name, stat in feeds.statistics.items():
        if not isinstance(stat, Statistic):
            raise TypeError(f"{method.name}: statistic {name!r} must be a Statistic, got {stat!r}.")
        _validate.one_of(f"{method.name} statistic {name!r} source", stat.over, SOURCES)
        _validate.one_of(f"{method.name} statistic {name!r} order", stat.order, ORDERS)
        _validate.positive_int(**{f"{method.name} statistic {name!r} batch_size": stat.batch_size})
    if feeds.run is not None:
        keys = set(feeds.run)
        if len(keys) != 1 or not keys <= {"steps", "epochs"}:
            raise ValueError(
                f"{method.name}: feeds.run must be {{'steps': k}} or {{'epochs': e}}, got {feeds.run}."
            )
    _validate.positive_int(**{f"{method.name} batch_size": feeds.batch_size})
    _validate.one_of(f"{method.name} guarantee", method.guarantee, GUARANTEES)
    return method


def with_run(
    method: Unlearner, *, steps: int | None = None, epochs: float | None = None
) -> Unlearner:
    """``method`` with its own run length, e.g. for :func:`~unlearn_jax.methods.sequence`.

    Args:
      method: an :class:`Unlearner` whose run length the caller chooses.
      steps: the number of updates, or
      epochs: the number of epochs (exactly one of the two).

    Raises:
      ValueError: both or neither given, or the method fixes its own run (one-shot methods).
    """
    check_unlearner(method)
    if (steps is None) == (epochs is None):
        raise ValueError(f"with_run({method.name}): pass exactly one of steps= or epochs=.")
    if method.feeds.run is not None:
        raise ValueError(
            f"{method.name} fixes its own run length ({dict(method.feeds.run)}); it takes no "
            "steps or epochs."
        )
    if steps is not None:
        _validate.positive_int(steps=steps)
        run = {"steps": int(steps)}
    else:
        _validate.positive(epochs=epochs)
        run = {"epochs": float(epochs)}
    return method._replace(feeds=method.feeds._replace(run=run))


def phase_index(phases: tuple[tuple[str, int | None], ...], step: jax.Array, plan: RunPlan):
    """The phase (index into ``phases``) that step ``step`` belongs to, computed from ``plan``.

    An epoch runs its active phases in order, each for one pass over its side (``plan.forget_steps``
    or ``plan.retain_steps`` steps); phases with ``epochs=k`` are active in the first ``k`` epochs
    only. Pure integer arithmetic on traced values: no per-run table, no recompilation.

    Returns:
      An int32 scalar in ``[0, len(phases))``.
    """
    if len(phases) == 1:
        return jnp.zeros((), jnp.int32)
    step = jnp.asarray(step, jnp.int32)
    lengths = [plan.forget_steps if side == FORGET else plan.retain_steps for side, _ in phases]
    limits = sorted({e for _, e in phases if e is not None})
    bounds = [0, *limits]  # epoch boundaries of segments with a constant set of active phases
    result = jnp.zeros((), jnp.int32)
    seg_start = jnp.zeros((), jnp.int32)
    for s, first_epoch in enumerate(bounds):
        active = [i for i, (_, e) in enumerate(phases) if e is None or e > first_epoch]
        epoch_len = sum(lengths[i] for i in active)
        epoch_len = jnp.maximum(epoch_len, 1)
        last = s == len(bounds) - 1
        seg_epochs = None if last else bounds[s + 1] - first_epoch
        offset = (step - seg_start) % epoch_len
        index = _first_phase(active, lengths, offset)
        in_segment = step >= seg_start
        if not last:
            seg_end = seg_start + seg_epochs * epoch_len
            in_segment = in_segment & (step < seg_end)
            seg_start = seg_end
        result = jnp.where(in_segment, index, result)
    return result


def _first_phase(active: list[int], lengths, offset) -> jax.Array:
    """The first active phase whose cumulative end exceeds ``offset`` (steps into the epoch)."""
    index = jnp.asarray(active[-1], jnp.int32)
    cum = jnp.zeros((), jnp.int32)
    found = jnp.zeros((), bool)
    for i in active:
        cum = cum + lengths[i]
        hit = (offset < cum) & ~found
        index = jnp.where(hit, i, index)
        found = found | hit
    return index


def epoch_lengths(
    phases, forget_steps: int, retain_steps: int, epoch: int
) -> list[tuple[int, int]]:
    """``[(phase index, steps), ...]`` of epoch ``epoch`` (host-side; the driver's run length)."""
    out = []
    for i, (side, epochs) in enumerate(phases):
        if epochs is None or epoch < epochs:
            out.append((i, forget_steps if side == FORGET else retain_steps))
    return out


def run_length(phases, forget_steps: int, retain_steps: int, *, steps=None, epochs=None) -> int:
    """The number of steps of a run given in ``steps`` or ``epochs`` (a fraction of the last epoch
    rounds up)."""
    if steps is not None:
        return int(steps)
    total = 0
    full = int(epochs)
    for e in range(full):
        total += sum(n for _, n in epoch_lengths(phases, forget_steps, retain_steps, e))
    fraction = epochs - full
    if fraction > 0:
        last = sum(n for _, n in epoch_lengths(phases, forget_steps, retain_steps, full))
        total += math.ceil(fraction * last)
    return max(total, 1)


__all__ = [
    "FORGET",
    "GUARANTEES",
    "RETAIN",
    "TRAIN",
    "Checks",
    "Feeds",
    "RunPlan",
    "Statistic",
    "Unlearner",
    "check_unlearner",
    "phase_index",
    "run_length",
    "with_run",
]
