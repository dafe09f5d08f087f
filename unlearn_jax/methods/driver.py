"""The driver: run an :class:`~unlearn_jax.methods.protocol.Unlearner` on a model and a forget request.

:func:`unlearn` is the only loop. For one request it

1. validates the inputs (an empty forget set, a forget set that overlaps the retain set, labels
   outside the model's outputs, inputs of the wrong shape all fail here, before any compilation);
2. computes the statistics the method declared (``feeds.statistics``) by streaming reductions over
   the data, one batch on the device at a time (:func:`compute_statistics`);
3. runs ``init`` once and ``update`` for the run's steps on fixed-size batches padded with a row mask,
   so every step, every run length and every request size share ONE compiled program (the jitted
   steps are module-level, keyed on the method's functions and the task: a second request compiles
   nothing);
4. checks the losses for NaN/inf every ``check_every`` steps (one host copy per check), and returns an
   :class:`UnlearnResult`.

:func:`unlearn_many` does the same for ``M`` stacked models as one ``vmap`` per step, for every
method (one-shot methods included: their statistics are ``vmap``-ed reductions). A
:class:`~unlearn_jax.methods.compose.Sequence` of methods runs stage after stage, each stage's
statistics computed on the previous stage's result.

Batches. Each side's batches walk through successive epochs; epoch ``e`` visits the examples in the
order ``jax.random.permutation(fold_in(side_key, e), n)`` cut into ``ceil(n / B)`` batches of ``B``
rows, the last one padded (``mask == 0``). A side smaller than ``B`` is therefore seen whole, padded,
at every step. Every example is seen exactly once per pass.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.core import reductions
from unlearn_jax.core.batch import pad_batch
from unlearn_jax.core.task import CLASSIFICATION, SEQUENCE, Task
from unlearn_jax.data.batching import padded_batches
from unlearn_jax.data.dataset import by_class, concat
from unlearn_jax.methods.protocol import (
    FORGET,
    RETAIN,
    RunPlan,
    Unlearner,
    check_unlearner,
    run_length,
)
from unlearn_jax.sharding.placement import Frozen, Placement
from unlearn_jax.sharding.placement import placement as make_placement

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class UnlearnResult(NamedTuple):
    """What :func:`unlearn` returns.

    Attributes:
      state: the unlearned ``TrainState`` (only ``params`` changed).
      method_state: the method's final state (e.g. a saliency mask, solver information).
      metrics: per-step metrics, each a ``[steps]`` numpy array, keyed as the method names them.
      wall_time: seconds from the first statistic to the last update's result being ready.
      steps: number of ``update`` calls.
      method: the method's name.
      hparams: the method's hyper-parameters plus the driver's (steps, batch size, epochs).
      guarantee: ``"exact"``, ``"certified"`` or ``"approximate"`` (the method's).
    """

    state: Any
    method_state: Any
    metrics: dict[str, np.ndarray]
    wall_time: float
    steps: int
    method: str
    hparams: dict
    guarantee: str = "approximate"


class UnlearnManyResult(NamedTuple):
    """What :func:`unlearn_many` returns.

    Attributes:
      states: the ``M`` unlearned models as one stacked ``TrainState`` (leading model axis).
      method_states: the ``M`` final method states, stacked.
      metrics: per-step metrics, each ``[M, steps]``.
      wall_time: seconds for all ``M`` models.
      steps: ``update`` calls per model.
      method: the method's name.
      hparams: as in :class:`UnlearnResult`.
      guarantee: the method's guarantee.
    """

    states: Any
    method_states: Any
    metrics: dict[str, np.ndarray]
    wall_time: float
    steps: int
    method: str
    hparams: dict
    guarantee: str = "approximate"


class NonFiniteLossError(FloatingPointError):
    """Raised when a step of an unlearning method produced a NaN or infinite loss.

    Attributes:
      step: the first step whose loss was not finite.
      model: the model index (:func:`unlearn_many`), else ``None``.
      last_finite_state: the ``TrainState`` at the last check that found only finite losses (the
        input state if the first check failed), so the work before the failure is not lost.
    """

    def __init__(self, message: str, step: int, model: int | None = None):
        super().__init__(message)
        self.step = step
        self.model = model
        self.last_finite_state = None


# ---- validation ------------------------------------------------------------------------------------
def _sized(data: Any, name: str) -> int:
    if data is None:
        return 0
    for attr in ("x", "y", "ids"):
        if not hasattr(data, attr):
            raise TypeError(
                f"{name} must be an unlearn_jax.data.Dataset (with x, y, ids), got "
                f"{type(data).__name__}."
            )
    return len(data)


def _check_data_against_model(task: Task, params: Any, data: Any, name: str) -> None:
    """Static checks that ``data`` fits the model: input shape, kind, label range."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be an unlearn_jax.Task, got {type(task).__name__}.")
    kind = getattr(data, "kind", None)
    if kind is not None and kind != task.kind:
        raise ValueError(
            f"the task is {task.kind} but {name} ({getattr(data, 'name', '')!r}) is {kind}; build "
            f"the task with kind={kind!r}."
        )
    x = np.asarray(data.x[:1])
    try:
        out = jax.eval_shape(task.apply, params, jax.ShapeDtypeStruct(x.shape, x.dtype))
    except Exception as error:  # a Flax scope error names no data: say what the model expects
        raise ValueError(
            f"{name} has inputs of shape {tuple(np.shape(data.x)[1:])} (dtype {x.dtype}) per "
            f"example, which the model does not accept: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    if task.kind == CLASSIFICATION or task.kind == SEQUENCE:
        k = out.shape[-1]
        y = np.asarray(data.y)
        if y.size and (y.min() < 0 or y.max() >= k):
            raise ValueError(
                f"{name} has labels in [{int(y.min())}, {int(y.max())}] but the model has {k} "
                f"outputs; labels must lie in [0, {k})."
            )


def _check_inputs(method: Unlearner, task, params, forget, retain) -> tuple[int, int]:
    """Validates a request; returns ``(n_forget, n_retain)``."""
    check_unlearner(method)
    n_forget = _sized(forget, "forget")
    if forget is None or n_forget == 0:
        raise ValueError(f"{method.name}: the forget set is empty; there is nothing to unlearn.")
    n_retain = _sized(retain, "retain")
    sides = method.feeds.sides()
    if RETAIN in sides and n_retain == 0:
        raise ValueError(
            f"{method.name} needs retain data (it reads retain batches or a statistic of the "
            f"training set), but retain={'None' if retain is None else 'an empty set'} was given."
        )
    if retain is not None and n_retain:
        common = np.intersect1d(np.asarray(forget.ids), np.asarray(retain.ids))
        if common.size:
            raise ValueError(
                f"{method.name}: {common.size} ids are in both the forget and the retain set (e.g. "
                f"{common[:5].tolist()}); a retain set must not contain what is to be forgotten."
            )
    _check_data_against_model(task, params, forget, "forget")
    if retain is not None and n_retain:
        _check_data_against_model(task, params, retain, "retain")
    return n_forget, n_retain


# ---- data ------------------------------------------------------------------------------------------
def statistic_data(source: str, order: str, forget, retain):
    """The data set a statistic streams over: forget, retain, or retain then forget (``"train"``)."""
    ordered = by_class if order == "by_class" else (lambda d: d)
    if source == FORGET:
        return ordered(forget)
    if source == RETAIN:
        return ordered(retain)
    return concat(ordered(retain), ordered(forget), "train")


def compute_statistics(
    method: Unlearner,
    task: Task,
    params: Any,
    forget,
    retain=None,
    *,
    batch_size: int,
    key: jax.Array,
    given: Mapping[str, reductions.Reduced] | None = None,
    stacked: bool = False,
    placement: Placement | None = None,
) -> dict[str, reductions.Reduced]:
    """The statistics ``method`` declares, by streaming reductions over the data.

    Args:
      method: the :class:`Unlearner`.
      task, params: the model (``params`` stacked with a leading model axis if ``stacked``).
      forget, retain: the request's data sets.
      batch_size: rows per batch for statistics that do not fix their own.
      key: PRNG key; statistic ``i`` (in declaration order) uses ``fold_in(key, i)``.
      given: statistics already computed (e.g. cached at training time), used as they are.
      stacked: ``params`` hold ``M`` models; every statistic gets a leading model axis.
      placement: a :class:`~unlearn_jax.sharding.Placement` (statistics computed sharded).

    Returns:
      ``{name: Reduced}`` for every declared statistic.
    """
    given = dict(given or {})
    unknown = set(given) - set(method.feeds.statistics)
    if unknown:
        raise ValueError(
            f"{method.name} declares no statistics {sorted(unknown)}; it reads "
            f"{sorted(method.feeds.statistics)}."
        )
    out = {}
    for i, (name, stat) in enumerate(method.feeds.statistics.items()):
        if name in given:
            out[name] = given[name]
            continue
        if stat.value is not None:
            out[name] = stat.value
            continue
        dataset = statistic_data(stat.over, stat.order, forget, retain)
        # Always the full batch size, the last batch padded: a request of any size compiles nothing.
        rows = stat.batch_size or batch_size
        if placement is not None:
            rows = -(-rows // placement.batch_size_multiple) * placement.batch_size_multiple
        out[name] = reductions.reduce(
            stat.reduction(task),
            params,
            # Padded on the host (no per-size device op), in data order.
            ({**batch, "mask": mask} for batch, mask in padded_batches(dataset, rows)),
            key=jax.random.fold_in(key, i),
            rows=rows,
            stacked=stacked,
            placement=placement,
        )
    return out


def batch_stream(dataset, rows: int, key: jax.Array) -> Iterator[Batch]:
    """Endless padded batches of exactly ``rows`` rows, epoch after epoch (module docstring)."""
    epoch = 0
    while True:
        for batch, mask in padded_batches(dataset, rows, key=jax.random.fold_in(key, epoch)):
            yield pad_batch({**batch, "mask": mask}, rows)
        epoch += 1


# ---- planning ----------------------------------------------------------------------------------------
def _bucket(n: int) -> int:
    return max(8, 1 << (max(n, 1) - 1).bit_length())


def _rows(method: Unlearner, size: int, batch_size: int) -> int:
    """Rows of a side's batches: the caller's batch size (smaller sets padded to it, so requests of
    any size share one compilation), or, for a method that fixes its own (a curvature sample), that
    cap or the power-of-two bucket of the set's size, whichever is smaller."""
    if method.feeds.batch_size is None:
        return batch_size
    return min(method.feeds.batch_size, _bucket(size))


def _plan(method: Unlearner, n_forget, n_retain, steps, epochs, batch_size):
    """``(forget rows, retain rows, total steps, RunPlan, epochs)`` of a run (``epochs`` as given,
    or as the method fixes it; ``None`` for a run given in steps)."""
    _validate.positive_int(batch_size=batch_size)
    feeds = method.feeds
    if feeds.run is not None:
        if steps is not None or epochs is not None:
            raise ValueError(
                f"{method.name} fixes its own run length ({dict(feeds.run)}): do not pass steps or "
                "epochs."
            )
        steps, epochs = feeds.run.get("steps"), feeds.run.get("epochs")
    elif (steps is None) == (epochs is None):
        raise ValueError(f"{method.name} is iterative: pass exactly one of steps= or epochs=.")
    if steps is not None:
        _validate.positive_int(steps=steps)
    else:
        _validate.positive(epochs=epochs)
    forget_rows = _rows(method, n_forget, batch_size)
    retain_rows = _rows(method, n_retain, batch_size)
    forget_steps = math.ceil(n_forget / forget_rows)
    retain_steps = math.ceil(n_retain / retain_rows) if n_retain else 0
    total = run_length(feeds.phases, forget_steps, retain_steps, steps=steps, epochs=epochs)
    plan = RunPlan.create(total, forget_steps, retain_steps, n_forget, n_retain)
    return forget_rows, retain_rows, total, plan, epochs


# ---- compiled pieces (cached across calls, keyed on the method's functions and the placement) -------
@functools.cache
def _compiled(init, update, task, stacked: bool, shardings: Frozen | None):
    """``(init, update)`` jitted once per method, task, model axis and placement.

    ``update`` donates the parameters and the method state. Under a placement, ``shardings`` is
    ``(params, state, stats, forget batch, retain batch)``: both outputs keep their inputs'
    shardings (the invariant optax keeps), the metrics are replicated.
    """

    def init_fn(params, key, stats, plan):
        if stacked:
            return jax.vmap(lambda p, s: init(task, p, key, s, plan))(params, stats)
        return init(task, params, key, stats, plan)

    def update_fn(params, state, forget_batch, retain_batch, key):
        if stacked:
            return jax.vmap(lambda p, s: update(task, p, s, forget_batch, retain_batch, key))(
                params, state
            )
        return update(task, params, state, forget_batch, retain_batch, key)

    if shardings is None:
        return jax.jit(init_fn), jax.jit(update_fn, donate_argnums=(0, 1))
    params_sh, state_sh, stats_sh, forget_sh, retain_sh = shardings.tree
    return (
        jax.jit(init_fn, in_shardings=(params_sh, None, stats_sh, None), out_shardings=state_sh),
        jax.jit(
            update_fn,
            in_shardings=(params_sh, state_sh, forget_sh, retain_sh, None),
            out_shardings=(params_sh, state_sh, None),
            donate_argnums=(0, 1),
        ),
    )


def _shardings(method, task, params, key, stats, plan, stacked, placement) -> Frozen | None:
    """The frozen shardings of :func:`_compiled` for a run under ``placement``."""
    if placement is None:
        return None

    def init_shapes(p, s):
        if stacked:
            return jax.vmap(lambda p1, s1: method.init(task, p1, key, s1, plan))(p, s)
        return method.init(task, p, key, s, plan)

    state_shapes = jax.eval_shape(init_shapes, params, stats)
    # One sharding for every leaf of a batch (a pytree prefix): the leading axis over the batch axes.
    batch = lambda side: placement.batch() if side in method.feeds.batches else None
    return Frozen((placement.of(params), placement.of(state_shapes), placement.of(stats),
                   batch(FORGET), batch(RETAIN)))  # fmt: skip


def compiled_steps(
    method: Unlearner,
    task: Task,
    params: Any,
    stats: Mapping[str, reductions.Reduced],
    plan: RunPlan,
    *,
    key: jax.Array,
    stacked: bool = False,
    placement: Placement | None = None,
):
    """The jitted ``(init, update)`` that :func:`unlearn` runs, for inspection and benchmarks.

    ``init(params, key, stats, plan)`` and ``update(params, state, forget_batch, retain_batch,
    key)`` with the task bound; under a placement their in/out shardings are fixed (the parameters
    and the method state keep theirs; ``update`` donates both). Lower them for XLA's
    ``memory_analysis()``: ``update.lower(params, state, fb, rb, key).compile()``. The same cached
    objects as the driver's, so compiling here warms :func:`unlearn` up.
    """
    check_unlearner(method)
    shardings = _shardings(method, task, params, key, stats, plan, stacked, placement)
    return _compiled(method.init, method.update, task, stacked, shardings)


def _copy(tree):
    """Fresh buffers for every array leaf: the steps donate their inputs, never the caller's."""
    return jax.tree_util.tree_map(lambda a: a.copy() if isinstance(a, jax.Array) else a, tree)


def _strongly_typed(tree):
    """Every numeric leaf a strongly typed array (a weakly typed input would compile twice)."""

    def convert(leaf):
        if isinstance(leaf, jax.Array | np.ndarray | int | float | np.number):
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jax.dtypes.prng_key):
                return leaf
            return jnp.asarray(leaf, dtype=dtype)
        return leaf

    return jax.tree_util.tree_map(convert, tree)


def _check_finite(history: list[Metrics], first_step: int, method: str, stacked: bool) -> None:
    """Raises :class:`NonFiniteLossError` at the first NaN/inf loss; one host copy per call."""
    if not history or "loss" not in history[0]:
        return
    losses = np.asarray(jnp.stack([jnp.reshape(m["loss"], (-1,)) for m in history]))  # [steps, M]
    bad = np.argwhere(~np.isfinite(losses))
    if bad.size:
        step, model = (int(v) for v in bad[0])
        who = f"the loss of model {model}" if stacked else "the loss"
        raise NonFiniteLossError(
            f"{method}: {who} became {losses[step, model]} at step {first_step + step}; unlearning "
            "was stopped so that no NaN model is returned (the exception's last_finite_state holds "
            "the last checked state). Lower the learning rate, add gradient clipping, or check the "
            "data for NaNs.",
            first_step + step,
            model if stacked else None,
        )


def _stderr_is_tty() -> bool:
    import sys

    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _run(
    method: Unlearner,
    state,
    task: Task,
    forget,
    retain,
    *,
    key,
    steps,
    epochs,
    batch_size,
    check_every,
    progress,
    stats,
    stacked: bool,
    placement: Placement | None,
):
    """The shared body of :func:`unlearn` and :func:`unlearn_many`."""
    _validate.positive_int(check_every=check_every)
    params = state.params
    first_params = jax.tree_util.tree_map(lambda a: a[0], params) if stacked else params
    n_forget, n_retain = _check_inputs(method, task, first_params, forget, retain)
    _validate.finite(params, "state.params")
    if method.checks is not None and method.checks.request is not None:
        count = jax.tree_util.tree_leaves(params)[0].shape[0] if stacked else 1
        for m in range(count):
            model = jax.tree_util.tree_map(lambda a, m=m: a[m], params) if stacked else params
            method.checks.request(task, model, forget, retain)
    # A method that fixes its own run length gives its epochs back: they are recorded in hparams.
    forget_rows, retain_rows, total, plan, epochs = _plan(
        method, n_forget, n_retain, steps, epochs, batch_size
    )
    if placement is not None:
        # Batches are split over the mesh's batch axes: their rows a multiple of those devices.
        multiple = placement.batch_size_multiple
        forget_rows, retain_rows = (
            -(-r // multiple) * multiple for r in (forget_rows, retain_rows)
        )
        params = placement.put(params)
    stats_key, init_key, forget_key, retain_key, step_key = jax.random.split(key, 5)
    hparams = dict(method.hparams, steps=total, batch_size=forget_rows, epochs=epochs)

    start = time.perf_counter()
    statistics = compute_statistics(
        method, task, params, forget, retain, batch_size=batch_size, key=stats_key, given=stats,
        stacked=stacked, placement=placement,
    )  # fmt: skip
    if method.checks is not None and method.checks.stats is not None:
        method.checks.stats(statistics)
    init_fn, update_fn = _compiled(
        method.init, method.update, task, stacked,
        _shardings(method, task, params, init_key, statistics, plan, stacked, placement),
    )  # fmt: skip
    method_state = init_fn(params, init_key, statistics, plan)
    params, method_state = _strongly_typed(_copy(params)), _strongly_typed(_copy(method_state))
    feeds = method.feeds
    forget_stream = (
        batch_stream(forget, forget_rows, forget_key) if FORGET in feeds.batches else None
    )
    retain_stream = (
        batch_stream(retain, retain_rows, retain_key) if RETAIN in feeds.batches else None
    )

    from tqdm.auto import tqdm  # local: keeps the library's import time low

    show = progress if progress is not None else _stderr_is_tty()
    bar = tqdm(total=total, desc=method.name, disable=not show or total == 1, leave=False)
    history: list[Metrics] = []
    pending: list[Metrics] = []
    last_good = state
    try:
        for step in range(total):
            fb = next(forget_stream) if forget_stream is not None else None
            rb = next(retain_stream) if retain_stream is not None else None
            if placement is not None:
                fb, rb = placement.put_batch(fb), placement.put_batch(rb)
            step_key_t = jax.random.fold_in(step_key, step)
            params, method_state, metrics = update_fn(params, method_state, fb, rb, step_key_t)
            pending.append(metrics)
            bar.update(1)
            if len(pending) == check_every or step == total - 1:
                try:
                    _check_finite(pending, step - len(pending) + 1, method.name, stacked)
                except NonFiniteLossError as error:
                    error.last_finite_state = last_good
                    raise
                history.extend(pending)
                pending = []
                # A copy: the next step donates ``params`` (one copy per check, not per step).
                last_good = state.replace(params=_copy(params))
    finally:
        bar.close()
    jax.block_until_ready(params)
    wall = time.perf_counter() - start
    found = _validate.nonfinite(params, stacked=stacked)
    if found is not None:
        where, model = found
        error = NonFiniteLossError(
            f"{method.name}: the parameters became NaN or infinite (params{where}"
            + (f", model {model}" if stacked else "")
            + "); unlearning was stopped so that no NaN model is returned (the exception's "
            "last_finite_state holds the last checked state).",
            total - 1,
            model,
        )
        error.last_finite_state = last_good
        raise error
    axis = 1 if stacked else 0
    arrays = (
        {k: np.stack([np.asarray(m[k]) for m in history], axis=axis) for k in history[0]}
        if history
        else {}
    )
    if method.checks is not None and method.checks.result is not None:
        method.checks.result(method_state, arrays)
    return state.replace(params=params), method_state, arrays, wall, total, hparams


def unlearn(
    method,
    state,
    task: Task,
    forget,
    retain=None,
    *,
    key: jax.Array,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 64,
    stats: Mapping[str, reductions.Reduced] | None = None,
    check_every: int = 50,
    progress: bool | None = None,
    mesh=None,
    rules=None,
    logical=None,
) -> UnlearnResult:
    """Runs ``method`` on ``state`` to remove ``forget`` (keeping ``retain``).

    Args:
      method: an :class:`~unlearn_jax.methods.protocol.Unlearner`, or a
        :class:`~unlearn_jax.methods.compose.Sequence` of them.
      state: the trained model's ``TrainState`` (any object with ``params`` and ``replace``).
      task: how to read the model's outputs and loss.
      forget: the data to remove (a :class:`~unlearn_jax.data.Dataset`).
      retain: the data to keep, or ``None`` for methods that do not need it.
      key: PRNG key; the run is deterministic given it.
      steps: number of updates for a method whose run length the caller chooses.
      epochs: alternatively, epochs (one pass per active phase; ``feeds.phases``). Exactly one of
        ``steps``/``epochs`` for such methods; neither for methods that fix their own (one-shot).
      batch_size: rows per batch (each side), unless the method fixes its own.
      stats: statistics already computed (e.g. cached at training time), by the names the method
        declares in ``feeds.statistics``; the others are computed here.
      check_every: steps between checks of the losses for NaN/inf (each check is one host copy).
      progress: a tqdm progress bar (``None``: only when stderr is a terminal).
      mesh: a ``jax.sharding.Mesh`` (axes among ``data``, ``fsdp``, ``tensor``) to run on: the
        parameters are placed by ``rules`` (:class:`~unlearn_jax.sharding.ShardingRules`, default
        :data:`~unlearn_jax.sharding.DEFAULT_RULES`; ``logical``: the parameters' Flax logical axis
        names, :func:`~unlearn_jax.sharding.logical_axes`), the method state and the statistics get
        shardings from their shapes, batches are split over the batch axes (their rows rounded up
        to a multiple of those devices), and every compiled step returns the parameters and the
        method state with the shardings they came in with. ``None``: no mesh (the library never
        creates one).

    Returns:
      An :class:`UnlearnResult`.

    Raises:
      ValueError: an empty forget set, a forget set overlapping the retain set, labels outside the
        model's outputs, inputs the model does not accept, a missing retain set, an invalid
        steps/epochs combination.
      NonFiniteLossError: a step produced a non-finite loss (the message gives the step).
    """
    from unlearn_jax.methods.compose import Sequence

    if isinstance(method, Sequence):
        return method.run(
            unlearn, state, task, forget, retain, key=key, batch_size=batch_size,
            check_every=check_every, progress=progress, steps=steps, epochs=epochs, stats=stats,
            mesh=mesh, rules=rules, logical=logical,
        )  # fmt: skip
    method = check_unlearner(method)
    out_state, method_state, arrays, wall, total, hparams = _run(
        method, state, task, forget, retain, key=key, steps=steps, epochs=epochs,
        batch_size=batch_size, check_every=check_every, progress=progress, stats=stats,
        stacked=False, placement=make_placement(mesh, rules, logical),
    )  # fmt: skip
    return UnlearnResult(
        out_state, method_state, arrays, wall, total, method.name, hparams, method.guarantee
    )


def unlearn_many(
    method,
    states,
    task: Task,
    forget,
    retain=None,
    *,
    key: jax.Array,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 64,
    stats: Mapping[str, reductions.Reduced] | None = None,
    check_every: int = 50,
    mesh=None,
    rules=None,
    logical=None,
) -> UnlearnManyResult:
    """Runs ``method`` on ``M`` stacked models at once (e.g. the originals of several seeds).

    Every model sees the same batches and the same method randomness as :func:`unlearn` with the
    same ``key`` would give it, so model ``m`` of the result equals ``unlearn`` on model ``m``
    (up to floating-point reassociation in the batched kernels). Statistics, ``init`` and every
    ``update`` are ``vmap``-ed over the model axis: each step is ONE jitted call for all models, for
    every method.

    Args:
      method, task, forget, retain, key, steps, epochs, batch_size, check_every, mesh, rules,
        logical: as in :func:`unlearn`; ``stats`` as there, each with a leading model axis.
      states: a ``TrainState`` whose param leaves carry a leading model axis ``M`` (from
        :func:`unlearn_jax.training.fit_many`).

    Returns:
      An :class:`UnlearnManyResult`.

    Raises:
      As :func:`unlearn`; a non-finite loss names the model and the step.
    """
    from unlearn_jax.methods.compose import Sequence

    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
             for leaf in jax.tree_util.tree_leaves(states.params)}  # fmt: skip
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"states must carry one leading model axis on every param leaf; sizes {sorted(map(str, sizes))}."
        )
    if isinstance(method, Sequence):
        return method.run(
            unlearn_many, states, task, forget, retain, key=key, batch_size=batch_size,
            check_every=check_every, steps=steps, epochs=epochs, stats=stats,
            mesh=mesh, rules=rules, logical=logical,
        )  # fmt: skip
    method = check_unlearner(method)
    out_states, method_states, arrays, wall, total, hparams = _run(
        method, states, task, forget, retain, key=key, steps=steps, epochs=epochs,
        batch_size=batch_size, check_every=check_every, progress=False, stats=stats,
        stacked=True, placement=make_placement(mesh, rules, logical),
    )  # fmt: skip
    return UnlearnManyResult(
        out_states, method_states, arrays, wall, total, method.name, hparams, method.guarantee
    )


__all__ = [
    "NonFiniteLossError",
    "UnlearnManyResult",
    "UnlearnResult",
    "batch_stream",
    "compiled_steps",
    "compute_statistics",
    "statistic_data",
    "unlearn",
    "unlearn_many",
]
