"""Methods by name, with the settings the benchmark runs them at and the grids ``--sweep`` searches.

Each entry is a :class:`MethodSpec`: a ``build(**hparams) -> Unlearner`` function, default
hyper-parameters, the run length and batch size passed to :func:`~unlearn_jax.methods.unlearn`, and a
small grid for the sweep. The defaults keep each paper's objective and its own hyper-parameters
(NPO's beta, SCRUB's temperature, SalUn's mask fraction, SSD's alpha and lambda, ...) and set the
learning rates and budgets for the embedded benchmark (an MLP on scikit-learn's digits): papers'
CIFAR/LLM learning rates do not transfer to it, which is what ``--sweep`` is for.

:func:`build` takes overrides of both kinds, so ``unlearn-jax unlearn --method npo --set beta=0.2
--set epochs=3`` reaches either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from unlearn_jax import _validate
from unlearn_jax.methods import gradient as G
from unlearn_jax.methods.analytic import acu
from unlearn_jax.methods.protocol import Unlearner
from unlearn_jax.methods.iau import iau
from unlearn_jax.methods.influence import influence_removal
from unlearn_jax.methods.ssd import ssd
from unlearn_jax.methods.woodfisher import woodfisher

RUN_KEYS = ("epochs", "steps", "batch_size")


class MethodSpec(NamedTuple):
    """How the benchmark builds and runs one method.

    Attributes:
      build: ``build(**hparams) -> Unlearner``.
      hparams: default hyper-parameters for ``build``.
      run: default keyword arguments of :func:`~unlearn_jax.methods.unlearn` (``epochs`` or
        ``steps``, ``batch_size``); empty for one-shot methods.
      grid: ``{name: [values]}`` searched by ``--sweep`` (hyper-parameters or run keys).
      description: one line for listings.
    """

    build: Callable[..., Unlearner]
    hparams: dict[str, Any]
    run: dict[str, Any]
    grid: dict[str, list]
    description: str


def _clipped_sgd(learning_rate: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(learning_rate))


def _gradient_ascent(learning_rate: float) -> Unlearner:
    return G.gradient_ascent(optimizer=_clipped_sgd(learning_rate))


def _adam_method(factory):
    def build(learning_rate: float, **kwargs):
        return factory(optimizer=optax.adam(learning_rate), **kwargs)

    return build


def _sam_npo(learning_rate: float, rho: float, beta: float) -> Unlearner:
    return G.sam(G.npo(beta=beta, optimizer=optax.adam(learning_rate)), rho=rho)


_LR_GRID = [1e-4, 5e-4, 2e-3]

METHODS: dict[str, MethodSpec] = {
    "finetune": MethodSpec(
        G.finetune,
        {"learning_rate": 0.01},
        {"epochs": 2, "batch_size": 64},
        {"learning_rate": [0.003, 0.01, 0.03]},
        "fine-tune on the retain set (FT)",
    ),
    "gradient_ascent": MethodSpec(
        _gradient_ascent,
        {"learning_rate": 0.02},
        {"steps": 5, "batch_size": 64},
        {"steps": [3, 5, 10]},
        "gradient ascent on the forget set (GA), clipped SGD",
    ),
    "grad_diff": MethodSpec(
        _adam_method(G.grad_diff),
        {"learning_rate": 2e-4, "gamma": 1.0},
        {"epochs": 2, "batch_size": 64},
        {"learning_rate": _LR_GRID},
        "GradDiff: -l(D_f) + gamma l(D_r)",
    ),
    "random_label": MethodSpec(
        G.random_label,
        {"learning_rate": 5e-3},
        {"epochs": 1, "batch_size": 64},
        {"learning_rate": [2e-3, 5e-3, 1e-2]},
        "random wrong labels on the forget set (RL)",
    ),
    "npo": MethodSpec(
        _adam_method(G.npo),
        {"learning_rate": 2e-4, "beta": 0.1},
        {"epochs": 2, "batch_size": 64},
        {"learning_rate": _LR_GRID},
        "negative preference optimisation (NPO) + retain loss",
    ),
    "simnpo": MethodSpec(
        _adam_method(G.simnpo),
        {"learning_rate": 2e-4},
        {"epochs": 2, "batch_size": 64},
        {"learning_rate": _LR_GRID},
        "reference-free NPO (SimNPO) + retain loss",
    ),
    "l1_sparse": MethodSpec(
        G.l1_sparse,
        {"learning_rate": 0.01, "gamma": 5e-4},
        {"epochs": 2, "batch_size": 64},
        {"gamma": [1e-4, 5e-4, 2e-3]},
        "fine-tune with a decaying l1 penalty (l1-sparse)",
    ),
    "salun": MethodSpec(
        G.salun,
        {"learning_rate": 5e-3},
        {"epochs": 1, "batch_size": 64},
        {"learning_rate": [2e-3, 5e-3, 1e-2]},
        "saliency mask + random labels (SalUn)",
    ),
    "scrub": MethodSpec(
        G.scrub,
        {"learning_rate": 5e-3},
        {"epochs": 3, "batch_size": 64},
        {"learning_rate": [2e-3, 5e-3, 1e-2]},
        "SCRUB: max-steps on forget, min-steps on retain",
    ),
    "bad_teacher": MethodSpec(
        G.bad_teacher,
        {"learning_rate": 1e-4},
        {"epochs": 2, "batch_size": 64},
        {"learning_rate": [1e-4, 3e-4, 1e-3]},
        "distil the original on retain, a random net on forget",
    ),
    "sam_npo": MethodSpec(
        _sam_npo,
        {"learning_rate": 2e-4, "rho": 0.01, "beta": 0.1},
        {"epochs": 2, "batch_size": 64},
        {"rho": [0.005, 0.01, 0.05]},
        "sharpness-aware NPO (SAM robust unlearning)",
    ),
    # With the per-example Fisher, I_D contains the forget set, so I_f > alpha I_D needs
    # alpha < n / n_f: the paper's alpha = 10 selects nothing when a tenth of the data goes.
    "ssd": MethodSpec(
        ssd,
        {"alpha": 5.0, "lam": 0.1},
        {},
        {"alpha": [2.0, 5.0, 10.0], "lam": [0.1, 1.0]},
        "selective synaptic dampening (SSD), per-example Fisher importances",
    ),
    "influence": MethodSpec(
        influence_removal,
        {"curvature": "ggn", "damping": 1e-2, "solver": "cg"},
        {},
        {"damping": [1e-3, 1e-2, 1e-1]},
        "Newton / influence removal with GGN curvature and CG",
    ),
    "woodfisher": MethodSpec(
        woodfisher,
        {"alpha": 0.2},
        {},
        {"alpha": [0.2, 1.0, 10.0]},
        "WoodFisher influence unlearning (IU), exact Woodbury solve",
    ),
    "iau": MethodSpec(
        iau,
        {"learning_rate": 1e-3},
        {},
        {"learning_rate": [1e-3, 3e-3, 1e-2]},
        "influence approximation unlearning (IAU), one step",
    ),
    # ACU's paper uses gamma = 0.1 in float64; in float32 the Woodbury updates of
    # R = (F^T F + gamma I)^-1 on 128-d MLP features lose definiteness at 0.1 for some seeds.
    "acu": MethodSpec(
        acu,
        {"gamma": 1.0},
        {},
        {"gamma": [0.1, 1.0, 10.0]},
        "analytic exact unlearning of a ridge head (ACU) on frozen features",
    ),
}


def build(name: str, **overrides: Any) -> tuple[Unlearner, dict[str, Any]]:
    """The method ``name`` with ``overrides`` applied, and the keyword arguments to run it with.

    Args:
      name: a key of :data:`METHODS`.
      **overrides: hyper-parameters of the method's ``build`` and/or run keys (``epochs``,
        ``steps``, ``batch_size``). ``num_classes`` is accepted and ignored (methods read the
        number of classes from the model's outputs).

    Returns:
      ``(unlearner, run_kwargs)``: call ``unlearn(unlearner, ..., **run_kwargs)``.

    Raises:
      ValueError: an unknown method name (listing the valid ones) or an unknown hyper-parameter.
    """
    _validate.one_of("method", name, METHODS)
    overrides.pop("num_classes", None)
    spec = METHODS[name]
    run = dict(spec.run)
    hparams = dict(spec.hparams)
    for key, value in overrides.items():
        if key in RUN_KEYS:
            if spec.run == {} and key != "batch_size":
                raise ValueError(f"{name} is one-shot: it takes no {key}.")
            if key in ("epochs", "steps"):
                run.pop("epochs", None)
                run.pop("steps", None)
            run[key] = value
        else:
            hparams[key] = value
    try:
        method = spec.build(**hparams)
    except TypeError as error:
        raise ValueError(f"{name}: bad hyper-parameters {hparams}: {error}") from error
    if method.feeds.run is not None:  # the method fixes its own run length
        run.pop("epochs", None)
        run.pop("steps", None)
    return method, run
