"""The unlearning-method protocol and the :func:`unlearn` driver.

Like optax's ``GradientTransformation``, a method is a NamedTuple of pure functions, and whatever it
needs besides the model (reference parameters, a Fisher, a saliency mask, an optimizer state) lives in
its own ``method_state``, apart from the ``TrainState``::

    init(train_state, task, forget, retain, key) -> method_state
    update(train_state, method_state, task, forget_batch, retain_batch, key)
        -> (train_state, method_state, metrics)

``forget``/``retain`` in ``init`` are whole :class:`~unlearn_jax.data.Dataset`s (``retain`` may be
``None``); ``init`` may stream over them (e.g. to accumulate a Fisher). ``update`` receives one batch of
each (dicts ``{"x", "y", "id"}`` with a fixed batch size, or ``None`` for an unused side).

* An ITERATIVE method (``one_shot=False``) has ``update`` called for many steps with mini-batches; the
  driver jits it once and feeds fixed-size batches, so it compiles once.
* A ONE-SHOT method (SSD, Newton removal, analytic unlearning) has ``update`` called exactly once with
  the whole forget set (and the whole retain set when it needs one) as a single batch.

``unlearn`` is the only loop: it validates the inputs, runs ``init``, feeds batches, guards against
non-finite losses, times the run and returns an :class:`UnlearnResult`.

A method whose schedule depends on the run (a weight that decays over the run's steps, passes that
alternate between the forget and the retain set) sets ``plan``: before ``init`` the driver calls
``plan(RunInfo(...))`` with the data sizes, the batch size and the requested ``steps``/``epochs``, and
runs the :class:`Unlearner` it returns for the number of steps it returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from unlearn_jax import _validate
from unlearn_jax.core.task import Task
from unlearn_jax.data.batching import batch_stream

MethodState = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

InitFn = Callable[[TrainState, Task, Any, Any, jax.Array], MethodState]
UpdateFn = Callable[
    [TrainState, MethodState, Task, Batch | None, Batch | None, jax.Array],
    tuple[TrainState, MethodState, Metrics],
]


class Unlearner(NamedTuple):
    """An unlearning method: a pair of pure functions plus what the driver needs to know.

    Attributes:
      init: ``init(train_state, task, forget, retain, key) -> method_state``.
      update: ``update(train_state, method_state, task, forget_batch, retain_batch, key) ->
        (train_state, method_state, metrics)``; ``metrics`` is a flat dict of scalars with
        slash-separated keys, and should contain ``"loss"`` (checked for finiteness).
      name: a short name used in tables and records (``"npo"``, ``"sam+npo"``).
      needs_retain: whether ``retain`` must be given.
      needs_forget_batches: whether ``update`` reads forget batches (False e.g. for fine-tuning).
      one_shot: ``update`` runs once on the whole data (see module docstring).
      epoch_over: ``"forget"`` or ``"retain"``: which set one epoch walks over, for ``epochs=``.
      hparams: the hyper-parameters, recorded with every result so a run can be repeated.
      plan: optional ``plan(RunInfo) -> (Unlearner, total_steps)`` for iterative methods whose
        update depends on the length of the run (see the module docstring); the returned
        ``Unlearner`` is run as is (its own ``plan`` is ignored). ``None``: the driver derives the
        number of steps from ``steps``/``epochs`` and ``epoch_over``.
      parts: what the method was assembled from, for wrappers that rebuild it (e.g.
        :func:`unlearn_jax.methods.sam` reads the objective and transforms of a gradient method);
        ``None`` for methods not built from parts.
    """

    init: InitFn
    update: UpdateFn
    name: str
    needs_retain: bool = False
    needs_forget_batches: bool = True
    one_shot: bool = False
    epoch_over: str = "forget"
    hparams: dict = {}  # noqa: RUF012 -- NamedTuple default, never mutated
    plan: Callable[[RunInfo], tuple[Unlearner, int]] | None = None
    parts: Any = None


class RunInfo(NamedTuple):
    """What the driver knows about a run before it starts; the argument of ``Unlearner.plan``.

    Attributes:
      forget_size: number of forget examples (>= 1).
      retain_size: number of retain examples (0 when no retain set is given).
      batch_size: the requested batch size; a side with fewer examples uses all of them per step
        (:func:`fixed_size_batches`), i.e. ``min(batch_size, size)`` examples.
      steps: the requested number of steps, or ``None``.
      epochs: the requested number of epochs, or ``None`` (exactly one of the two is set).
    """

    forget_size: int
    retain_size: int
    batch_size: int
    steps: int | None
    epochs: float | None


def steps_per_pass(size: int, batch_size: int) -> int:
    """Steps of fixed-size batches that see each of ``size`` examples once: ``ceil(n / min(B, n))``."""
    if size <= 0:
        return 0
    return math.ceil(size / min(batch_size, size))


class UnlearnResult(NamedTuple):
    """What :func:`unlearn` returns.

    Attributes:
      state: the unlearned ``TrainState``.
      method_state: the method's final state (e.g. a saliency mask, solver information).
      metrics: per-step metrics, each a ``[steps]`` numpy array, keyed as the method names them.
      wall_time: seconds from the start of ``init`` to the last update's result being ready.
      steps: number of ``update`` calls.
      method: the method's name.
      hparams: the method's hyper-parameters plus the driver's (steps, batch size, seed).
    """

    state: TrainState
    method_state: MethodState
    metrics: dict[str, np.ndarray]
    wall_time: float
    steps: int
    method: str
    hparams: dict


class NonFiniteLossError(FloatingPointError):
    """Raised when a step of an unlearning method produced a NaN or infinite loss.

    Attributes:
      step: the first step whose loss was not finite.
      last_finite_state: the ``TrainState`` at the last check that found only finite losses (the
        input state if the first check failed), so the work before the failure is not lost.
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
        self.last_finite_state = None


def _sized(data, name: str):
    if data is None:
        return 0
    try:
        return len(data)
    except TypeError as exc:
        raise TypeError(
            f"{name} must be a Dataset (with len() and as_batch()), got {type(data)}"
        ) from exc


def fixed_size_batches(dataset, batch_size: int, key: jax.Array) -> Iterator[Batch]:
    """An endless stream of batches of exactly ``min(batch_size, len(dataset))`` examples.

    Batches walk through successive random permutations of the data set; a batch that reaches the
    end of one permutation is completed from the start of the next, so every step has the same shape
    (one compilation) and every example is seen once per ``len(dataset)`` examples drawn.
    """
    return batch_stream(dataset, min(batch_size, len(dataset)), key=key)


def _batch_streams(method: Unlearner, forget, retain, batch_size: int, forget_key, retain_key):
    """The forget and retain batch streams a method reads (``None`` for a side it does not)."""
    forget_stream = (
        fixed_size_batches(forget, batch_size, forget_key) if method.needs_forget_batches else None
    )
    use_retain = retain is not None and len(retain) > 0 and method.needs_retain
    retain_stream = fixed_size_batches(retain, batch_size, retain_key) if use_retain else None
    return forget_stream, retain_stream


def _check_finite_loss(metrics: list[Metrics], first_step: int, method: str):
    """Raises on the first step whose loss is NaN/inf; one device-to-host copy per check."""
    if not metrics or "loss" not in metrics[0]:
        return
    losses = np.asarray(jnp.stack([m["loss"] for m in metrics]))
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = first_step + int(bad[0])
        raise NonFiniteLossError(
            f"{method}: the loss became {losses[bad[0]]} at step {step}; unlearning was stopped so "
            "that no NaN model is returned (the exception's last_finite_state holds the last checked "
            "state). Lower the learning rate, add gradient clipping, or check the data for NaNs.",
            step,
        )


def _check_run_inputs(method: Unlearner, forget, retain) -> tuple[int, int]:
    """Validates the method and the data of a run; returns ``(len(forget), len(retain) or 0)``."""
    if not isinstance(method, Unlearner):
        raise TypeError(
            f"method must be an Unlearner (e.g. unlearn_jax.methods.npo()), got {type(method)}"
        )
    n_forget = _sized(forget, "forget")
    if forget is None or n_forget == 0:
        raise ValueError(f"{method.name}: the forget set is empty; there is nothing to unlearn.")
    n_retain = _sized(retain, "retain")
    if method.needs_retain and (retain is None or n_retain == 0):
        raise ValueError(
            f"{method.name} needs retain data (it keeps the model's utility on it), but retain="
            f"{'None' if retain is None else 'an empty set'} was given."
        )
    return n_forget, n_retain


def _plan_run(
    method: Unlearner, n_forget: int, n_retain: int, steps, epochs, batch_size: int
) -> tuple[Unlearner, int]:
    """The method to run (after its ``plan``, if any) and the number of ``update`` calls."""
    _validate.positive_int(batch_size=batch_size)
    if method.one_shot:
        if steps is not None or epochs is not None:
            raise ValueError(f"{method.name} is one-shot: do not pass steps or epochs.")
        return method, 1
    else:
        if (steps is None) == (epochs is None):
            raise ValueError(f"{method.name} is iterative: pass exactly one of steps= or epochs=.")
        if steps is not None:
            _validate.positive_int(steps=steps)
            total_steps = steps
        else:
            _validate.positive(epochs=epochs)
        if method.plan is not None:
            info = RunInfo(n_forget, n_retain, batch_size, steps, epochs)
            method, total_steps = method.plan(info)
            _validate.positive_int(total_steps=total_steps)
        elif steps is None:
            # One epoch is one pass of fixed-size batches over the chosen side; a side smaller than
            # the batch is seen whole every step, so an epoch is then one step.
            n_epoch = n_retain if method.epoch_over == "retain" else n_forget
            total_steps = max(1, math.ceil(epochs * steps_per_pass(n_epoch, batch_size)))

    return method, total_steps


def unlearn(
    method: Unlearner,
    state: TrainState,
    task: Task,
    forget,
    retain=None,
    *,
    key: jax.Array,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 64,
    check_every: int = 50,
    progress: bool | None = None,
) -> UnlearnResult:
    """Runs ``method`` on ``state`` to remove ``forget`` (keeping ``retain``).

    Args:
      method: an :class:`Unlearner`.
      state: the trained model's ``TrainState``.
      task: how to read the model's outputs and loss.
      forget: the data to remove (a :class:`~unlearn_jax.data.Dataset`).
      retain: the data to keep, or ``None`` for methods that do not need it.
      key: PRNG key; the run is deterministic given it.
      steps: number of updates for an iterative method.
      epochs: alternatively, passes over ``method.epoch_over`` (``ceil(epochs * ceil(n / min(
        batch_size, n)))`` steps), or as ``method.plan`` counts them. Exactly one of
        ``steps``/``epochs`` for iterative methods; neither for one-shot ones.
      batch_size: examples per side per step.
      check_every: steps between checks of the losses for NaN/inf (each check is one host copy).
      progress: a tqdm progress bar (``None``: only when stderr is a terminal).

    Returns:
      An :class:`UnlearnResult`.

    Raises:
      ValueError: an empty forget set, a missing retain set for a method that needs it, an invalid
        steps/epochs combination.
      NonFiniteLossError: a step produced a non-finite loss (the message gives the step).
    """
    n_forget, n_retain = _check_run_inputs(method, forget, retain)
    method, total_steps = _plan_run(method, n_forget, n_retain, steps, epochs, batch_size)
    _validate.positive_int(check_every=check_every)

    init_key, forget_key, retain_key, step_key = jax.random.split(key, 4)
    hparams = dict(method.hparams, steps=total_steps, batch_size=batch_size, epochs=epochs)
    last_good = state
    start = time.perf_counter()
    method_state = method.init(state, task, forget, retain, init_key)

    if method.one_shot:
        forget_batch = forget.as_batch()
        retain_batch = retain.as_batch() if (retain is not None and method.needs_retain) else None
        state, method_state, metrics = method.update(
            state, method_state, task, forget_batch, retain_batch, step_key
        )
        jax.block_until_ready((state, metrics))
        wall = time.perf_counter() - start
        try:
            _check_finite_loss([metrics], 0, method.name)
        except NonFiniteLossError as error:
            error.last_finite_state = last_good
            raise
        arrays = {k: np.asarray(v)[None] for k, v in metrics.items()}
        return UnlearnResult(state, method_state, arrays, wall, 1, method.name, hparams)

    step_fn = jax.jit(lambda s, ms, fb, rb, k: method.update(s, ms, task, fb, rb, k))
    # A weakly typed input leaf (jnp.full(.., 0.1), TrainState.create's Python step 0) comes back
    # strongly typed from the first step and would make the second step compile again.
    state, method_state = _strongly_typed(state), _strongly_typed(method_state)
    forget_stream, retain_stream = _batch_streams(
        method, forget, retain, batch_size, forget_key, retain_key
    )

    from tqdm.auto import tqdm  # local: keeps import time of the library low

    show = progress if progress is not None else _stderr_is_tty()
    bar = tqdm(total=total_steps, desc=method.name, disable=not show, leave=False)
    history: list[Metrics] = []
    pending: list[Metrics] = []
    for step in range(total_steps):
        fb = next(forget_stream) if forget_stream is not None else None
        rb = next(retain_stream) if retain_stream is not None else None
        state, method_state, metrics = step_fn(
            state, method_state, fb, rb, jax.random.fold_in(step_key, step)
        )
        pending.append(metrics)
        bar.update(1)
        if len(pending) == check_every or step == total_steps - 1:
            try:
                _check_finite_loss(pending, step - len(pending) + 1, method.name)
            except NonFiniteLossError as error:
                bar.close()
                error.last_finite_state = last_good
                raise
            history.extend(pending)
            pending = []
            last_good = state
    bar.close()
    jax.block_until_ready(state)
    wall = time.perf_counter() - start
    arrays = (
        {k: np.asarray(jnp.stack([m[k] for m in history])) for k in history[0]} if history else {}
    )
    return UnlearnResult(state, method_state, arrays, wall, total_steps, method.name, hparams)


class UnlearnManyResult(NamedTuple):
    """What :func:`unlearn_many` returns.

    Attributes:
      states: the ``M`` unlearned models as one stacked ``TrainState`` (leading model axis).
      metrics: per-step metrics, each ``[M, steps]``.
      wall_time: seconds for all ``M`` models.
      steps: ``update`` calls per model.
      method: the method's name.
      hparams: as in :class:`UnlearnResult`.
      vectorised: True when the models ran as one ``vmap``-ed computation; False when the method's
        ``init`` or ``update`` needs concrete values (host-side logic) and the models ran in a loop.
    """

    states: TrainState
    metrics: dict[str, np.ndarray]
    wall_time: float
    steps: int
    method: str
    hparams: dict
    vectorised: bool


def unlearn_many(
    method: Unlearner,
    states: TrainState,
    task: Task,
    forget,
    retain=None,
    *,
    key: jax.Array,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 64,
    check_every: int = 50,
) -> UnlearnManyResult:
    """Runs ``method`` on ``M`` stacked models at once (e.g. the originals of several seeds).

    Every model sees the same forget/retain batches (drawn from ``key`` as in :func:`unlearn`);
    model ``m``'s own randomness (its ``init`` and per-step keys) is ``fold_in(key, m)``-derived.
    ``init`` and ``update`` are ``vmap``-ed over the model axis and each step is ONE jitted call for
    all models. Methods whose ``init``/``update`` need concrete values (Python-side bookkeeping, as
    in analytic unlearning's id records) cannot be traced under ``vmap``; they fall back to a loop
    of :func:`unlearn` calls, each with ``key`` itself (same batches; per-model keys are then
    shared), and the result says so (``vectorised=False``).

    Args:
      method, task, forget, retain, steps, epochs, batch_size, check_every: as in :func:`unlearn`.
      states: a ``TrainState`` whose leaves carry a leading model axis ``M`` (from
        :func:`unlearn_jax.training.fit_many`).
      key: PRNG key.

    Returns:
      An :class:`UnlearnManyResult`.

    Raises:
      As :func:`unlearn`; a non-finite loss names the model and the step.
    """
    n_forget, n_retain = _check_run_inputs(method, forget, retain)
    sizes = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(states.params)}
    if len(sizes) != 1:
        raise ValueError(f"states must carry one leading model axis; leaf sizes {sorted(sizes)}.")
    (num_models,) = sizes
    planned, total_steps = _plan_run(method, n_forget, n_retain, steps, epochs, batch_size)
    init_key, forget_key, retain_key, step_key = jax.random.split(key, 4)
    model_keys = lambda base: jax.vmap(lambda m: jax.random.fold_in(base, m))(
        jnp.arange(num_models)
    )
    hparams = dict(planned.hparams, steps=total_steps, batch_size=batch_size, epochs=epochs)
    start = time.perf_counter()
    try:
        method_states = jax.vmap(lambda s, k: planned.init(s, task, forget, retain, k))(
            states, model_keys(init_key)
        )
        vmapped = jax.jit(
            jax.vmap(
                lambda s, ms, fb, rb, k: planned.update(s, ms, task, fb, rb, k),
                in_axes=(0, 0, None, None, 0),
            )
        )
        if planned.one_shot:
            retain_batch = (
                retain.as_batch() if (retain is not None and planned.needs_retain) else None
            )
            out, _, metrics = vmapped(
                states, method_states, forget.as_batch(), retain_batch, model_keys(step_key)
            )
            history = [metrics]
        else:
            states_, method_states = _strongly_typed(states), _strongly_typed(method_states)
            fs, rs = _batch_streams(planned, forget, retain, batch_size, forget_key, retain_key)
            history = []
            for step in range(total_steps):
                fb = next(fs) if fs is not None else None
                rb = next(rs) if rs is not None else None
                keys = model_keys(jax.random.fold_in(step_key, step))
                states_, method_states, metrics = vmapped(states_, method_states, fb, rb, keys)
                history.append(metrics)
                if len(history) % check_every == 0 or step == total_steps - 1:
                    _check_finite_many(history, planned.name)
            out = states_
        jax.block_until_ready(out)
        _check_finite_many(history, planned.name)
        arrays = {k: np.stack([np.asarray(m[k]) for m in history], axis=1) for k in history[0]}
        wall = time.perf_counter() - start
        return UnlearnManyResult(out, arrays, wall, total_steps, planned.name, hparams, True)
    except jax.errors.JAXTypeError:
        pass  # host-side logic in init/update: run the models one at a time below

    start = time.perf_counter()
    results = [
        unlearn(
            method,
            jax.tree_util.tree_map(lambda a, m=m: a[m], states),
            task,
            forget,
            retain,
            key=key,
            steps=steps,
            epochs=epochs,
            batch_size=batch_size,
            check_every=check_every,
            progress=False,
        )
        for m in range(num_models)
    ]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[r.state for r in results])
    arrays = {k: np.stack([r.metrics[k] for r in results]) for k in results[0].metrics}
    wall = time.perf_counter() - start
    return UnlearnManyResult(stacked, arrays, wall, results[0].steps, method.name, hparams, False)


def _check_finite_many(history: list[Metrics], method: str) -> None:
    if not history or "loss" not in history[0]:
        return
    losses = np.stack([np.asarray(m["loss"]).reshape(-1) for m in history])  # [steps, M]
    bad = np.argwhere(~np.isfinite(losses))
    if bad.size:
        step, model = (int(v) for v in bad[0])
        raise NonFiniteLossError(
            f"{method}: the loss of model {model} became {losses[step, model]} at step {step}; "
            "unlearning was stopped so that no NaN model is returned.",
            step,
        )


def _strongly_typed(tree):
    """``tree`` with every numeric leaf a strongly typed array of its dtype (keys left alone)."""

    def convert(leaf):
        if isinstance(leaf, jax.Array | np.ndarray | int | float | complex | np.number):
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jax.dtypes.prng_key):
                return leaf
            return jnp.asarray(leaf, dtype=dtype)
        return leaf

    return jax.tree_util.tree_map(convert, tree)


def _stderr_is_tty() -> bool:
    import sys

    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
