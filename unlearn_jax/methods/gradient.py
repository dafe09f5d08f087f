r"""Gradient-based unlearning methods, assembled from objective terms, gradient transforms and optax.

:func:`gradient_method` turns an objective (or a sequence of :class:`Phase`\ s), an optax optimizer and
a gradient transform into an :class:`~unlearn_jax.methods.protocol.Unlearner`. Every step is

.. code-block:: text

    ctx              = (reference params, forget batch, retain batch, key, task, step, progress)
    (loss, m), g     = value_and_grad(objective of this step's phase, params, ctx)  # transform.wrap
    g, t_state       = transform.update(g, t_state, params)                        # e.g. a mask, clip
    u, opt_state     = optimizer.update(g, opt_state, params)
    params           = where(mask, params + u, params)                              # mask: all True
                                                                                     # without a mask

one jitted function for every step of every run: the phase of a step is computed from the step
count kept in the method state and the run's :class:`~unlearn_jax.methods.protocol.RunPlan`
(``lax.switch`` over the phases), and schedules (l1's decaying weight) read the same step count.

The named recipes (:func:`finetune`, :func:`gradient_ascent`, :func:`grad_diff`, :func:`random_label`,
:func:`npo`, :func:`simnpo`, :func:`l1_sparse`, :func:`salun`, :func:`scrub`, :func:`bad_teacher`)
are a few lines each over those parts, with their papers' hyper-parameters as defaults; :func:`sam`
turns any of them into its sharpness-aware version. A new method is a few lines too::

    from unlearn_jax.methods import objectives as O
    method = gradient_method(O.npo(beta=0.1) + 1.0 * O.retain_loss() + 1e-4 * O.l1_norm(),
                             optax.adam(1e-3),
                             transform=chain(saliency_mask(0.5), optax.clip_by_global_norm(1.0)),
                             name="my_npo")
    result = unlearn(method, state, task, forget, retain, key=key, epochs=5, batch_size=64)

Learning rates: the defaults are those of each paper's own setting (CIFAR-scale SGD for the
image-classification methods, AdamW 1e-5 for the LLM methods NPO, SimNPO and GradDiff); a small model on
a small data set usually needs different values, which is why every recipe takes ``learning_rate`` and
``optimizer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from unlearn_jax import _validate
from unlearn_jax.methods import objectives as O
from unlearn_jax.methods.objectives import FORGET, RETAIN, Context, Objective, Term
from unlearn_jax.methods.protocol import Feeds, RunPlan, Unlearner, phase_index, with_run
from unlearn_jax.methods.transforms import (
    GradientTransform,
    as_transform,
    chain,
    identity,
    saliency_mask,
    sharpness_aware,
    value_and_grad,
)

Params = Any


class Phase(NamedTuple):
    """One pass of a phased method: an objective minimised over one side's batches.

    Every epoch of a phased method runs its active phases in order, each for one pass of fixed-size
    batches over its side (``ceil(n / B)`` steps).

    Attributes:
      objective: what this phase minimises (a :class:`~unlearn_jax.methods.objectives.Objective` or a
        single term).
      over: ``"forget"`` or ``"retain"``: the side one pass walks over.
      epochs: the phase runs in the first ``epochs`` epochs only (SCRUB's max-steps); ``None``: always.
      name: a label for records.
    """

    objective: Objective | Term
    over: str
    epochs: int | None = None
    name: str = ""


class GradientRecipe(NamedTuple):
    """What a gradient method is made of: the public shape of every method :func:`gradient_method`
    builds (``Unlearner.recipe``), which :func:`sam` and other wrappers rebuild from.

    Attributes:
      phases: the objective(s) and the sides their passes walk over.
      optimizer: the optax optimizer of the unlearning steps.
      transform: the :class:`~unlearn_jax.methods.transforms.GradientTransform` between the gradient
        and the optimizer (:func:`~unlearn_jax.methods.transforms.identity` when none).
      name: the method's name.
      hparams: hyper-parameters to record.
    """

    phases: tuple[Phase, ...]
    optimizer: optax.GradientTransformation
    transform: GradientTransform
    name: str
    hparams: dict


class GradientMethodState(NamedTuple):
    """The method state of a gradient method.

    Attributes:
      opt_state: the unlearning optimizer's state.
      ref_params: the parameters before unlearning (frozen), or ``None`` when no term reads them.
      term_states: per phase, ``{term label: state}`` of the terms with an ``init``.
      transform_state: the transform's state (e.g. a :class:`SaliencyState`).
      step: int32 scalar, number of updates done.
      plan: the run's :class:`~unlearn_jax.methods.protocol.RunPlan` (schedules and phases read it).
    """

    opt_state: Any
    ref_params: Params
    term_states: tuple
    transform_state: Any
    step: jax.Array
    plan: RunPlan


def _as_objective(objective: Any, where: str) -> Objective:
    if isinstance(objective, Term):
        objective = objective.as_objective()
    if not isinstance(objective, Objective):
        raise TypeError(
            f"{where} must be an Objective or a Term (e.g. `O.npo(beta=0.1) + 1.0 * O.retain_loss()`), "
            f"got {type(objective).__name__}."
        )
    if len(objective) == 0:
        raise ValueError(f"{where} has no terms.")
    return objective


def _normalise_phases(objective: Any, epoch_over: str | None) -> tuple[Phase, ...]:
    if isinstance(objective, Sequence) and not isinstance(objective, str):
        phases = tuple(objective)
        if not phases:
            raise ValueError("gradient_method got an empty sequence of phases.")
        if epoch_over is not None:
            raise ValueError("epoch_over applies to a single objective; phases set `over` each.")
        out = []
        for i, phase in enumerate(phases):
            if not isinstance(phase, Phase):
                raise TypeError(f"phase {i} must be a Phase, got {type(phase).__name__}.")
            _validate.one_of(f"phase {i} over", phase.over, (FORGET, RETAIN))
            _validate.positive_int(**{f"phase {i} epochs": phase.epochs})
            out.append(phase._replace(objective=_as_objective(phase.objective, f"phase {i}")))
        if all(p.epochs is not None for p in out):
            raise ValueError(
                "at least one phase must run in every epoch (epochs=None); otherwise a run given in "
                "steps could run out of phases."
            )
        return tuple(out)
    objective = _as_objective(objective, "objective")
    if epoch_over is None:
        epoch_over = FORGET if FORGET in objective.sides else RETAIN
    _validate.one_of("epoch_over", epoch_over, (FORGET, RETAIN))
    return (Phase(objective, epoch_over, None, ""),)


def _as_transform(transform: Any) -> GradientTransform:
    if transform is None:
        return identity()
    # GradientTransform and optax's GradientTransformation are NamedTuples: test them first.
    if isinstance(transform, GradientTransform) or (
        callable(getattr(transform, "init", None)) and callable(getattr(transform, "update", None))
    ):
        return as_transform(transform)
    if isinstance(transform, Sequence) and not isinstance(transform, str):
        return chain(*transform) if transform else identity()
    return as_transform(transform)


def gradient_method(
    objective: Objective | Term | Sequence[Phase],
    optimizer: optax.GradientTransformation,
    *,
    transform: Any = None,
    name: str = "gradient_method",
    epoch_over: str | None = None,
    hparams: dict | None = None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""Builds an iterative unlearning method from an objective, an optax optimizer and a transform.

    Args:
      objective: a single objective (minimised at every step), or a sequence of :class:`Phase`\ s
        run in turn within every epoch (SalUn, SCRUB).
      optimizer: any optax ``GradientTransformation``; its state is created at ``init`` from the
        parameters being unlearned.
      transform: a :class:`~unlearn_jax.methods.transforms.GradientTransform`, an optax
        transformation, or a sequence of them (chained in order, :func:`chain`); e.g.
        ``chain(sharpness_aware(0.01), saliency_mask(0.5), optax.clip_by_global_norm(1.0))``.
      name: the method's name in records.
      epoch_over: for a single objective, the side one epoch walks over; default ``"forget"`` if the
        objective has forget terms, else ``"retain"``.
      hparams: extra hyper-parameters to record.
      steps, epochs: optionally fix the run length here (then ``unlearn`` takes neither; needed
        inside :func:`~unlearn_jax.methods.sequence`).

    Returns:
      An :class:`~unlearn_jax.methods.protocol.Unlearner`. It reads forget batches iff some term acts
      on the forget side and retain batches iff some term acts on the retain side. Per-step metrics:
      ``loss``, each term's unweighted value under its label (``forget/npo``, ``retain/loss``; NaN on
      steps of a phase that does not have the term), ``grad_norm`` (of the final, transformed
      gradient) and, for phased methods, ``phase``.

    Guarantees:
      Approximate unlearning: no method built here equals retraining or carries a certificate.
      Masked-out weights (saliency mask) stay bit-identical.

    Raises:
      TypeError: a non-optax optimizer, a transform that is neither a ``GradientTransform`` nor an
        optax transformation, an objective that is not made of terms.
      ValueError: an empty objective, invalid phases.
    """
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (e.g. optax.sgd(0.01)), got "
            f"{type(optimizer).__name__}."
        )
    phases = _normalise_phases(objective, epoch_over)
    recipe = GradientRecipe(phases, optimizer, _as_transform(transform), name, dict(hparams or {}))
    method = build(recipe)
    if steps is not None or epochs is not None:
        method = with_run(method, steps=steps, epochs=epochs)
    return method


def _describe(recipe: GradientRecipe) -> dict:
    record = dict(recipe.hparams)
    record["phases"] = [
        {"over": p.over, "epochs": p.epochs, "name": p.name, "terms": p.objective.describe()}
        for p in recipe.phases
    ]
    t = recipe.transform
    if t.name != "identity":
        record["transform"] = {"name": t.name, **dict(t.hparams)}
    return record


def _nan_like(struct) -> jax.Array:
    return jnp.full(struct.shape, jnp.nan, struct.dtype)


def build(recipe: GradientRecipe) -> Unlearner:
    """The :class:`~unlearn_jax.methods.protocol.Unlearner` of a :class:`GradientRecipe`."""
    phases, optimizer, transform = recipe.phases, recipe.optimizer, recipe.transform
    sides = frozenset().union(*(p.objective.sides for p in phases))
    uses_reference = any(p.objective.uses_reference for p in phases)
    phased = len(phases) > 1
    phase_sides = tuple((p.over, p.epochs) for p in phases)

    def init(task, params, key, stats, plan):
        term_key, transform_key = jax.random.split(key)
        term_states = tuple(
            p.objective.init(task, params, k)
            for p, k in zip(phases, jax.random.split(term_key, len(phases)), strict=True)
        )
        transform_stats = {name: stats[name] for name in transform.statistics}
        return GradientMethodState(
            opt_state=optimizer.init(params),
            ref_params=params if uses_reference else None,
            term_states=term_states,
            transform_state=transform.init(params, transform_key, transform_stats),
            step=jnp.zeros((), jnp.int32),
            plan=plan,
        )

    def update(task, params, method_state, forget_batch, retain_batch, key):
        vg = value_and_grad
        t_state = method_state.transform_state
        if transform.wrap is not None:
            vg = transform.wrap(vg, t_state)
        step, plan = method_state.step, method_state.plan
        progress = step.astype(jnp.float32) / jnp.maximum(plan.total_steps, 1).astype(jnp.float32)
        ctx = Context(
            method_state.ref_params, forget_batch, retain_batch, key, task, step, progress
        )

        def branch(i):
            def run(p):
                (loss, metrics), g = vg(phases[i].objective, p, ctx, method_state.term_states[i])
                return jnp.asarray(loss, jnp.float32), metrics, g

            return run

        extra = {}
        if not phased:
            loss, metrics, g = branch(0)(params)
        else:
            # Every branch returns the union of the metric keys (NaN where a phase lacks a term).
            shapes = [jax.eval_shape(branch(i), params)[1] for i in range(len(phases))]
            keys = sorted(set().union(*shapes))
            structs = {k: s[k] for s in shapes for k in s}

            def filled(i):
                def run(p):
                    loss, m, g = branch(i)(p)
                    return loss, {k: m[k] if k in m else _nan_like(structs[k]) for k in keys}, g

                return run

            index = phase_index(phase_sides, step, plan)
            loss, metrics, g = jax.lax.switch(
                index, [filled(i) for i in range(len(phases))], params
            )
            extra["phase"] = index

        if transform.update is not None:
            g, t_state = transform.update(g, t_state, params)
        updates, opt_state = optimizer.update(g, method_state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if transform.update_mask is not None:
            # where(), not a multiplied update: masked weights keep their exact bits, whatever
            # weight decay or momentum the optimizer adds.
            new_params = jax.tree_util.tree_map(
                jnp.where, transform.update_mask(t_state), new_params, params
            )
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(g), **extra}
        new_state = method_state._replace(
            opt_state=opt_state, transform_state=t_state, step=step + 1
        )
        return new_params, new_state, metrics

    batches = tuple(side for side in (FORGET, RETAIN) if side in sides)
    return Unlearner(
        init=init,
        update=update,
        name=recipe.name,
        feeds=Feeds(batches=batches, phases=phase_sides, statistics=dict(transform.statistics)),
        guarantee="approximate",
        hparams=_describe(recipe),
        recipe=recipe,
    )


# ---- named recipes -------------------------------------------------------------------------------
def sgd(
    learning_rate: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> optax.GradientTransformation:
    r"""PyTorch-style SGD: :math:`g \leftarrow g + \lambda\theta`, heavy-ball momentum, step ``-lr``.

    The optimizer of the image-classification unlearning papers (SalUn, l1-sparse, SCRUB):
    ``optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum))``.
    """
    _validate.positive(learning_rate=learning_rate)
    _validate.non_negative(momentum=momentum, weight_decay=weight_decay)
    parts = []
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum if momentum > 0 else None))
    return optax.chain(*parts)


def _optimizer(optimizer, default_factory, record: dict) -> optax.GradientTransformation:
    if optimizer is None:
        return default_factory()
    record["optimizer"] = "custom"
    record.pop("learning_rate", None)
    return optimizer


def finetune(
    *,
    learning_rate: float = 0.01,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""Fine-tuning (FT): minimise the task loss on the retain set, :math:`\min_\theta \ell(D_r;\theta)`.

    Defaults: PyTorch-style SGD, learning rate 0.01, momentum 0.9, weight decay 5e-4 (the SalUn/l1-sparse
    CIFAR setting, which runs ~10 epochs). One epoch is a pass over the retain set. Needs no forget
    batches (the forget set only has to be non-empty).

    Guarantees:
      Approximate; relies on catastrophic forgetting of the forget set.

    References:
      Warnecke, Pirch, Wressnegger, Rieck. Machine Unlearning of Features and Labels. NDSS 2023;
      used as a baseline by Jia et al. 2023 and Fan et al. 2024 (SalUn).
    """
    record = {"learning_rate": learning_rate, "optimizer": "sgd(momentum=0.9, weight_decay=5e-4)"}
    opt = _optimizer(optimizer, lambda: sgd(learning_rate), record)
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(O.retain_loss(), opt, name="finetune", hparams=record, **run)


def gradient_ascent(
    *,
    learning_rate: float = 1e-4,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""Gradient ascent (GA): maximise the task loss on the forget set, :math:`\min_\theta -\ell(D_f;\theta)`.

    Defaults: SGD learning rate 1e-4, momentum 0.9, weight decay 5e-4, a few epochs over the forget set
    (GA diverges if run long: the loss is unbounded above). Needs no retain data.

    Guarantees:
      Approximate; collapses the model easily (see NPO).

    References:
      Thudi, Deza, Chandrasekaran, Papernot. Unrolling SGD: Understanding Factors Influencing Machine
      Unlearning. EuroS&P 2022; Jang et al. Knowledge Unlearning for Mitigating Privacy Risks in
      Language Models. ACL 2023.
    """
    record = {"learning_rate": learning_rate, "optimizer": "sgd(momentum=0.9, weight_decay=5e-4)"}
    opt = _optimizer(optimizer, lambda: sgd(learning_rate), record)
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(-O.forget_loss(), opt, name="gradient_ascent", hparams=record, **run)


def grad_diff(
    *,
    gamma: float = 1.0,
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""GradDiff: ascent on the forget set and descent on the retain set,
    :math:`\min_\theta -\ell(D_f;\theta) + \gamma\,\ell(D_r;\theta)`.

    Defaults: ``gamma = 1``, AdamW learning rate 1e-5 (TOFU's setting). One epoch is a pass over the
    forget set; every step also takes a retain batch.

    Guarantees:
      Approximate.

    References:
      Liu, Liu, Stone. Continual Learning and Private Unlearning. CoLLAs 2022; Maini et al. TOFU: A
      Task of Fictitious Unlearning for LLMs. 2024.
    """
    _validate.non_negative(gamma=gamma)
    record = {
        "gamma": gamma,
        "learning_rate": learning_rate,
        "optimizer": "adamw(weight_decay=0.01)",
    }
    opt = _optimizer(optimizer, lambda: optax.adamw(learning_rate, weight_decay=0.01), record)
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(
        -O.forget_loss() + gamma * O.retain_loss(), opt, name="grad_diff", hparams=record, **run
    )


def _relabel_phases() -> tuple[Phase, ...]:
    return (
        Phase(O.random_labels(), FORGET, None, "relabel forget"),
        Phase(O.retain_loss(), RETAIN, None, "retain"),
    )


def random_label(
    *,
    learning_rate: float = 0.01,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""Random labels (RL): fine-tune on the forget set with random wrong labels, then on the retain set.

    Every epoch makes a pass over the forget set minimising the cross-entropy against one fixed random
    wrong label per example (:func:`~unlearn_jax.methods.objectives.random_labels`), then a pass over
    the retain set minimising the true-label loss: SalUn without the mask, as in the SalUn code's RL.

    Defaults: SGD learning rate 0.01, momentum 0.9, weight decay 5e-4 (~10 epochs on CIFAR).

    Guarantees:
      Approximate.

    References:
      Golatkar, Achille, Soatto. Eternal Sunshine of the Spotless Net. CVPR 2020; Fan et al. SalUn.
      ICLR 2024 (the RL baseline).
    """
    record = {"learning_rate": learning_rate, "optimizer": "sgd(momentum=0.9, weight_decay=5e-4)"}
    opt = _optimizer(optimizer, lambda: sgd(learning_rate), record)
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(_relabel_phases(), opt, name="random_label", hparams=record, **run)


def npo(
    beta: float = 0.1,
    *,
    retain_weight: float = 1.0,
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""Negative preference optimisation, with a retain term (NPO+RT) unless ``retain_weight=0``:
    :math:`\min_\theta L_{\text{NPO},\beta}(\theta; D_f) + w\,\ell(D_r;\theta)`
    (:func:`~unlearn_jax.methods.objectives.npo_loss`; the reference model is the one before unlearning).

    Defaults: ``beta = 0.1``, retain weight 1, AdamW learning rate 1e-5 (the paper's TOFU setting).

    Guarantees:
      Approximate; drifts towards collapse exponentially slower than gradient ascent.

    References:
      Zhang, Lin, Bai, Mei. Negative Preference Optimization: From Catastrophic Collapse to Effective
      Unlearning. COLM 2024 (arXiv:2404.05868).
    """
    _validate.non_negative(retain_weight=retain_weight)
    record = {"beta": beta, "retain_weight": retain_weight, "learning_rate": learning_rate,
              "optimizer": "adamw(weight_decay=0.01)"}  # fmt: skip
    objective = O.npo(beta=beta)
    if retain_weight > 0:
        objective = objective + retain_weight * O.retain_loss()
    opt = _optimizer(optimizer, lambda: optax.adamw(learning_rate, weight_decay=0.01), record)
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(objective, opt, name="npo", hparams=record, **run)


def simnpo(
    beta: float = 2.5,
    gamma: float = 0.0,
    *,
    retain_weight: float = 0.125,
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""SimNPO, reference-free NPO with length normalisation, plus a retain term:
    :math:`\min_\theta L_{\text{SimNPO},\beta,\gamma}(\theta; D_f) + w\,\ell(D_r;\theta)`
    (:func:`~unlearn_jax.methods.objectives.simnpo_loss`).

    Defaults: ``beta = 2.5``, ``gamma = 0``, retain weight 0.125, AdamW learning rate 1e-5.

    Guarantees:
      Approximate.

    References:
      Fan et al. Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning.
      2024 (arXiv:2410.07163).
    """
    _validate.non_negative(retain_weight=retain_weight)
    record = {"beta": beta, "gamma": gamma, "retain_weight": retain_weight,
              "learning_rate": learning_rate, "optimizer": "adamw(weight_decay=0.01)"}  # fmt: skip
    objective = O.simnpo(beta=beta, gamma=gamma)
    if retain_weight > 0:
        objective = objective + retain_weight * O.retain_loss()
    opt = _optimizer(optimizer, lambda: optax.adamw(learning_rate, weight_decay=0.01), record)
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(objective, opt, name="simnpo", hparams=record, **run)


def l1_sparse(
    *,
    gamma: float = 5e-4,
    learning_rate: float = 0.01,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""l1-sparse unlearning: fine-tune on the retain set with a decaying l1 penalty,
    :math:`\min_\theta \ell(D_r;\theta) + \gamma_t\lVert\theta\rVert_1`, :math:`\gamma_t = \gamma\,(1 - t/T)`.

    Defaults: ``gamma = 5e-4``, SGD learning rate 0.01, momentum 0.9, weight decay 5e-4 (~10 epochs
    over the retain set on CIFAR). ``T`` is the run's number of steps.

    Guarantees:
      Approximate ("prune first, then unlearn": sparsity narrows the gap to retraining).

    References:
      Jia, Liu, Ram, Yao, Liu, Liu, Sharma, Liu. Model Sparsity Can Simplify Machine Unlearning.
      NeurIPS 2023 (arXiv:2304.04934).
    """
    _validate.non_negative(gamma=gamma)
    record = {"gamma": gamma, "learning_rate": learning_rate,
              "optimizer": "sgd(momentum=0.9, weight_decay=5e-4)"}  # fmt: skip
    opt = _optimizer(optimizer, lambda: sgd(learning_rate), record)
    objective = O.retain_loss() + gamma * O.l1_norm(decay="linear")
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(objective, opt, name="l1_sparse", hparams=record, **run)


def salun(
    *,
    fraction: float = 0.5,
    learning_rate: float = 0.013,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""SalUn: random-label unlearning restricted to the most salient weights.

    The saliency mask (:func:`~unlearn_jax.methods.transforms.saliency_mask`) keeps the ``fraction``
    of weights with the largest :math:`|\sum_{i\in D_f}\nabla\ell(z_i;\theta_0)|`, ranked across all
    tensors; then every epoch makes a pass over the forget set with random wrong labels and a pass over
    the retain set, updating only the masked weights (:math:`\theta \leftarrow \theta - \eta\,(m\odot
    \cdot)` through the optimizer; masked-out weights stay bit-identical, weight decay and momentum
    included).

    Defaults: ``fraction = 0.5``, SGD learning rate 0.013, momentum 0.9, weight decay 5e-4, 10 epochs
    (CIFAR-10).

    Guarantees:
      Approximate.

    References:
      Fan, Liu, Zhang, Wei, Wong, Liu. SalUn: Empowering Machine Unlearning via Gradient-based Weight
      Saliency in Both Image Classification and Generation. ICLR 2024 (arXiv:2310.12508).

    Raises:
      ValueError: ``fraction`` outside ``(0, 1]``.
    """
    record = {"fraction": fraction, "learning_rate": learning_rate, "momentum": momentum,
              "weight_decay": weight_decay}  # fmt: skip
    opt = _optimizer(optimizer, lambda: sgd(learning_rate, momentum, weight_decay), record)
    if optimizer is not None:
        record.pop("momentum")
        record.pop("weight_decay")
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(
        _relabel_phases(),
        opt,
        transform=saliency_mask(fraction),
        name="salun",
        hparams=record,
        **run,
    )


def scrub(
    *,
    temperature: float = 4.0,
    alpha: float = 0.001,
    gamma: float = 0.99,
    max_epochs: int = 2,
    learning_rate: float = 5e-4,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""SCRUB: a student (the model) moves away from its teacher (the original) on the forget set and
    stays close to it on the retain set.

    Each epoch, while ``epoch < max_epochs``, a pass of max-steps over the forget set minimising
    :math:`-\frac{T^2}{B}\sum_i \mathrm{KL}(p_{\text{teacher}}\,\|\,p_\theta)` (i.e. maximising the
    divergence), then a pass of min-steps over the retain set minimising
    :math:`\gamma\,\ell(D_r;\theta) + \alpha\,\frac{T^2}{B}\sum_i\mathrm{KL}(p_{\text{teacher}}\,\|\,
    p_\theta)`. Temperature-``T`` softmaxes (:func:`~unlearn_jax.methods.objectives.kl_divergence`).

    Defaults: ``T = 4``, ``alpha = 0.001``, ``gamma = 0.99``, 2 max-step epochs out of 3, SGD learning
    rate 5e-4, momentum 0.9, weight decay 5e-4 (the authors' CIFAR setting; run with ``epochs=3``).
    One "epoch" is the max pass (in the first ``max_epochs``) plus the min pass.

    Guarantees:
      Approximate.

    References:
      Kurmanji, Triantafillou, Hayes, Triantafillou. Towards Unbounded Machine Unlearning. NeurIPS
      2023 (arXiv:2302.09880).
    """
    _validate.positive_int(max_epochs=max_epochs)
    _validate.non_negative(alpha=alpha, gamma=gamma)
    record = {"temperature": temperature, "alpha": alpha, "gamma": gamma, "max_epochs": max_epochs,
              "learning_rate": learning_rate, "optimizer": "sgd(momentum=0.9, weight_decay=5e-4)"}  # fmt: skip
    opt = _optimizer(optimizer, lambda: sgd(learning_rate), record)
    phases = (
        Phase(-O.forget_kl(temperature), FORGET, max_epochs, "max"),
        Phase(gamma * O.retain_loss() + alpha * O.retain_kl(temperature), RETAIN, None, "min"),
    )
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(phases, opt, name="scrub", hparams=record, **run)


def bad_teacher(
    *,
    temperature: float = 1.0,
    learning_rate: float = 1e-4,
    optimizer=None,
    teacher_init=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""Bad Teacher: distil a randomly initialised ("incompetent") teacher on the forget set and the
    original ("competent") teacher on the retain set:
    :math:`\min_\theta \frac{T^2}{B}\sum_{i\in D_f}\mathrm{KL}(p_{\text{random}}\,\|\,p_\theta) +
    \frac{T^2}{B}\sum_{i\in D_r}\mathrm{KL}(p_{\text{original}}\,\|\,p_\theta)`.

    Each step takes one forget batch and one retain batch (equal weights; the paper shuffles the
    forget set with a retain subset into mixed batches). One epoch is a pass over the retain set; the
    paper uses one epoch over the forget set and 30% of the retain set: pass such a subset as
    ``retain`` to reproduce it.

    The random teacher's parameters come from ``teacher_init(key)`` if given (e.g.
    ``lambda k: model.init(k, x)["params"]``), otherwise from re-initialising every leaf of the
    model's parameters with the same shape (:func:`~unlearn_jax.methods.objectives.reinit_params`:
    LeCun-normal kernels, zero biases, unit norm scales, i.e. Flax's defaults for Dense/Conv); the
    key is the method's init key, so the teacher is reproducible.

    Defaults: ``T = 1``, Adam learning rate 1e-4, 1 epoch.

    Guarantees:
      Approximate.

    References:
      Chundawat, Tarun, Mandal, Kankanhalli. Can Bad Teaching Induce Forgetting? Unlearning in Deep
      Networks Using an Incompetent Teacher. AAAI 2023 (arXiv:2205.08096).
    """
    record = {"temperature": temperature, "learning_rate": learning_rate, "optimizer": "adam"}
    opt = _optimizer(optimizer, lambda: optax.adam(learning_rate), record)
    objective = O.forget_kl(temperature, teacher="random", teacher_init=teacher_init) + O.retain_kl(
        temperature
    )
    run = {"steps": steps, "epochs": epochs}
    return gradient_method(
        objective, opt, name="bad_teacher", epoch_over=RETAIN, hparams=record, **run
    )


def sam(method: Unlearner, rho: float = 0.01) -> Unlearner:
    r"""The sharpness-aware version of a gradient method: its forget terms' gradient taken at
    :math:`\theta + \rho\, g_f/\lVert g_f\rVert` and the rest at :math:`\theta`
    (:func:`~unlearn_jax.methods.transforms.sharpness_aware`), everything else unchanged.

    SAM needs the forget and retain parts of the objective, which an opaque ``update`` does not
    expose; every gradient method carries its public :class:`GradientRecipe` (``method.recipe``),
    and ``sam`` rebuilds the method from it with SAM chained before its transform.

    Args:
      method: an :class:`~unlearn_jax.methods.protocol.Unlearner` built by :func:`gradient_method`
        or a recipe here (e.g. ``sam(npo(beta=0.1), rho=0.01)``).
      rho: perturbation radius >= 0 (0.01 on MUSE, 0.1 on WMDP in the paper).

    Returns:
      The same method named ``"sam+<name>"``, with SAM applied before any other transform (a saliency
      mask then masks the SAM gradient); a run length fixed on ``method`` is kept.

    Guarantees:
      Approximate, as the wrapped method.

    References:
      Fan et al. Towards LLM Unlearning Resilient to Relearning Attacks: A Sharpness-Aware
      Minimization Perspective and Beyond. ICML 2025 (arXiv:2502.05374).

    Raises:
      TypeError: ``method`` has no gradient recipe (e.g. a one-shot method).
      ValueError: a negative ``rho``.
    """
    if not isinstance(method, Unlearner):
        raise TypeError(f"sam() wraps an Unlearner, got {type(method).__name__}.")
    recipe = method.recipe
    if not isinstance(recipe, GradientRecipe):
        raise TypeError(
            f"sam() needs a gradient method (gradient_method or a recipe such as npo()); "
            f"{method.name!r} has no gradient recipe, so its gradient cannot be re-taken."
        )
    transform = sharpness_aware(rho)
    if recipe.transform.name != "identity":
        transform = chain(transform, recipe.transform)
    recipe = recipe._replace(
        transform=transform,
        name=f"sam+{recipe.name}",
        hparams={**recipe.hparams, "sam_rho": rho},
    )
    out = build(recipe)
    return out._replace(feeds=out.feeds._replace(run=method.feeds.run))


__all__ = [
    "GradientMethodState",
    "GradientRecipe",
    "Phase",
    "bad_teacher",
    "build",
    "finetune",
    "grad_diff",
    "gradient_ascent",
    "gradient_method",
    "l1_sparse",
    "npo",
    "random_label",
    "salun",
    "sam",
    "scrub",
    "sgd",
    "simnpo",
]
