"""LM unlearning methods by name, with the settings the facts benchmark runs them at.

Each entry is an :class:`LMMethodSpec`: a ``build(**hparams) -> Unlearner`` over the recipes of
:mod:`unlearn_jax.methods.lm`, its hyper-parameters, and the run length and batch size passed to
:func:`~unlearn_jax.methods.unlearn`. Every base method also exists as ``sam_<name>``, its
sharpness-aware version (:func:`unlearn_jax.methods.lm.sam`) with the same settings and radius
``rho``.

The papers' settings are for 7B-parameter models (AdamW 1e-5, a few epochs over a forget set of
hundreds of questions); ``lm-tiny`` (0.48M parameters) memorising 40 fictitious authors needs larger
steps. The values here were chosen on the default benchmark (``unlearn-jax bench --data facts``, seed
0) so that each method's forget ROUGE lands near the oracle's without a collapse where the method
allows it; the measured table is in ``experiments/lm_facts.py``. The objectives and
their own constants (NPO's beta 0.1, SimNPO's beta 2.5, the retain weights, RMU's layer and alpha
ratio) are the papers'.

Methods that train towards refusals (``idk_nll``, ``idkpo``) need the alternate answers:
:func:`build` takes them as ``answers`` (the benchmark builds one refusal per forget question from
:data:`unlearn_jax.data.facts.REFUSALS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from unlearn_jax import _validate
from unlearn_jax.methods import lm
from unlearn_jax.methods.protocol import Unlearner

RUN_KEYS = ("epochs", "steps", "batch_size")
ANSWERS = ("idk_nll", "idkpo")
SAM_PREFIX = "sam_"


class LMMethodSpec(NamedTuple):
    """How the LM benchmark builds and runs one method.

    Attributes:
      build: ``build(**hparams) -> Unlearner`` (``answers=`` too for refusal methods).
      hparams: default hyper-parameters for ``build``.
      run: default keyword arguments of :func:`~unlearn_jax.methods.unlearn` (``steps`` or
        ``epochs``, ``batch_size``).
      description: one line for listings.
    """

    build: Callable[..., Unlearner]
    hparams: dict[str, Any]
    run: dict[str, Any]
    description: str


def _adamw(learning_rate: float) -> optax.GradientTransformation:
    # Clipping keeps the unbounded ascent objectives from a single runaway step on a tiny model.
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=0.01)
    )


def _with_adamw(recipe):
    def build(learning_rate: float, **kwargs):
        return recipe(optimizer=_adamw(learning_rate), **kwargs)

    build.__name__ = recipe.__name__
    return build


BASE: dict[str, LMMethodSpec] = {
    "ga": LMMethodSpec(
        _with_adamw(lm.gradient_ascent),
        {"learning_rate": 5e-4},
        {"steps": 20, "batch_size": 16},
        "gradient ascent on the forget answers",
    ),
    "grad_diff": LMMethodSpec(
        _with_adamw(lm.grad_diff),
        {"learning_rate": 5e-4, "gamma": 1.0, "retain": "nll"},
        {"steps": 20, "batch_size": 16},
        "GradDiff: ascent on forget, NLL on retain",
    ),
    "npo": LMMethodSpec(
        _with_adamw(lm.npo),
        {"learning_rate": 5e-4, "beta": 0.1, "retain_weight": 1.0, "retain": "nll"},
        {"steps": 20, "batch_size": 16},
        "NPO + retain NLL",
    ),
    "simnpo": LMMethodSpec(
        _with_adamw(lm.simnpo),
        {"learning_rate": 5e-4, "beta": 2.5, "gamma": 0.0, "retain_weight": 0.125},
        {"steps": 20, "batch_size": 16},
        "SimNPO + retain NLL",
    ),
    "idk_nll": LMMethodSpec(
        _with_adamw(lm.idk_nll),
        {"learning_rate": 5e-4, "retain_weight": 1.0},
        {"steps": 20, "batch_size": 16},
        "IdK: cross-entropy on refusals + retain NLL",
    ),
    "idkpo": LMMethodSpec(
        _with_adamw(lm.idk_dpo),
        {"learning_rate": 5e-4, "beta": 0.1, "retain_weight": 1.0},
        {"steps": 20, "batch_size": 16},
        "IdkDPO: prefer a refusal over the forget answer + retain NLL",
    ),
    "rmu": LMMethodSpec(
        _with_adamw(lm.rmu),
        {"learning_rate": 5e-4, "layer": 1, "coefficient": 40.0, "alpha": 10.0},
        {"steps": 20, "batch_size": 16},
        "RMU: steer block-1 activations on forget to c u, keep them on retain",
    ),
}


def _sam_build(base: LMMethodSpec) -> Callable[..., Unlearner]:
    def build(rho: float, **hparams):
        return lm.sam(base.build(**hparams), rho=rho)

    return build


SAM_RHO = 0.01

METHODS: dict[str, LMMethodSpec] = {
    **BASE,
    **{
        SAM_PREFIX + name: LMMethodSpec(
            _sam_build(spec),
            {**spec.hparams, "rho": SAM_RHO},
            dict(spec.run),
            f"sharpness-aware {spec.description}",
        )
        for name, spec in BASE.items()
    },
}
"""Every method by name: the base methods and their ``sam_`` versions."""

DEFAULT_METHODS = ("ga", "grad_diff", "npo", "simnpo", "idkpo", "rmu", "sam_npo")
"""The methods of ``--methods all`` is every one of :data:`METHODS`; these are the issue's list."""


def needs_answers(name: str) -> bool:
    """Whether method ``name`` trains towards alternate (refusal) answers."""
    return name.removeprefix(SAM_PREFIX) in ANSWERS


def resolve(name: str, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hparams, run)`` of method ``name`` with ``overrides`` (hyper-parameters or run keys).

    Raises:
      ValueError: an unknown method name (listing the valid ones).
    """
    _validate.one_of("LM method", name, METHODS)
    spec = METHODS[name]
    hparams, run = dict(spec.hparams), dict(spec.run)
    for key, value in overrides.items():
        if key in RUN_KEYS:
            if key in ("steps", "epochs"):
                run.pop("steps", None)
                run.pop("epochs", None)
            run[key] = value
        else:
            hparams[key] = value
    return hparams, run


def build(name: str, *, answers: Any = None, **overrides: Any) -> tuple[Unlearner, dict[str, Any]]:
    """Method ``name`` with ``overrides``, and the keyword arguments to run it with.

    Args:
      name: a key of :data:`METHODS`.
      answers: the refusal answers (a sequence dataset with the forget ids) for ``idk_nll``,
        ``idkpo`` and their SAM versions; ignored by the others.
      **overrides: hyper-parameters and/or run keys (``steps``, ``epochs``, ``batch_size``).

    Returns:
      ``(unlearner, run_kwargs)``: call ``unlearn(unlearner, ..., **run_kwargs)``.

    Raises:
      ValueError: an unknown name, a refusal method without ``answers``, bad hyper-parameters.
    """
    hparams, run = resolve(name, **overrides)
    if needs_answers(name):
        if answers is None:
            raise ValueError(f"{name} trains towards refusals: pass answers= (one per forget id).")
        hparams["answers"] = answers
    try:
        method = METHODS[name].build(**hparams)
    except TypeError as error:
        raise ValueError(f"{name}: bad hyper-parameters {sorted(hparams)}: {error}") from error
    return method, run


__all__ = [
    "BASE",
    "DEFAULT_METHODS",
    "METHODS",
    "SAM_RHO",
    "LMMethodSpec",
    "build",
    "needs_answers",
    "resolve",
]
