r"""Composable objective terms for gradient-based unlearning.

An unlearning objective is a weighted sum of terms, written as the papers write it::

    npo(beta=0.1) + 1.0 * retain_loss()          # NPO + RT
    -forget_loss() + 1.0 * retain_loss()         # GradDiff
    0.99 * retain_loss() + 0.001 * retain_kl(temperature=4.0)

Every term is a function of the parameters being optimised and of a :class:`Context` (the reference
parameters, this step's forget and retain batches, a PRNG key, the :class:`~unlearn_jax.Task`, the step
and the run's progress) and returns a scalar. Each term declares the *side* it acts on:

* ``"forget"``: reads the forget batch (ascent, random labels, NPO, SimNPO, KL on forget);
* ``"retain"``: reads the retain batch (retain loss, KL to the original on retain);
* ``"params"``: reads neither batch (the l1 norm).

Gradient transforms use the side: sharpness-aware minimisation perturbs the parameters for the forget
terms only (:mod:`unlearn_jax.methods.transforms`).

Likelihood-based terms (NPO, SimNPO) act on per-example log-likelihoods ``log pi(y|x)`` and lengths
``|y|``, never on raw logits: for a classifier ``log pi(y|x) = log_softmax(f(x))_y`` and ``|y| = 1``;
a sequence model supplies the summed token log-likelihood and the token count through its own
``log_likelihood`` function, so the same terms serve language-model unlearning.

Examples:
  >>> objective = npo(beta=0.1) + 1.0 * retain_loss()
  >>> objective
  Objective(1.0 * npo(beta=0.1) + 1.0 * retain_loss())
  >>> sorted(objective.sides)
  ['forget', 'retain']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.core.batch import masked_mean, row_mask
from unlearn_jax.core.task import CLASSIFICATION, Task

Params = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

FORGET = "forget"
RETAIN = "retain"
PARAMS = "params"
SIDES = (FORGET, RETAIN, PARAMS)

LogLikelihoodFn = Callable[[Task, Params, Batch], tuple[jax.Array, jax.Array]]
"""``log_likelihood(task, params, batch) -> (log_pi [B], lengths [B])``."""


class Context(NamedTuple):
    """Everything a term may read besides the parameters it is differentiated with respect to.

    Attributes:
      ref_params: the parameters before unlearning (frozen), or ``None`` when no term needs them.
      forget: this step's forget batch ``{"x": [B, ...], "y": [B], "id": [B], "mask": [B]}`` or
        ``None`` (``mask`` is 0 on padding rows; every term averages over the real rows only).
      retain: this step's retain batch, or ``None``.
      key: a PRNG key for this step.
      task: the :class:`~unlearn_jax.Task` (outputs and per-example losses).
      step: int32 scalar, the number of updates done before this one.
      progress: float32 scalar in ``[0, 1)``, ``step / total_steps`` (0 when the run length is unknown).
    """

    ref_params: Params
    forget: Batch | None
    retain: Batch | None
    key: jax.Array
    task: Task
    step: jax.Array
    progress: jax.Array


TermFn = Callable[[Params, Context, Any], jax.Array]
TermInit = Callable[[Params, jax.Array], Any]


def _format_hparams(hparams: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in hparams.items())


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
    """One objective term: ``fn(params, ctx, state) -> scalar``, added to objectives with weights.

    Attributes:
      name: the metric key of its value, side-prefixed (``"forget/npo"``, ``"retain/loss"``).
      side: ``"forget"``, ``"retain"`` or ``"params"`` (see the module docstring).
      fn: ``fn(params, ctx, state) -> scalar``: the term's (unweighted) value; ``state`` is what
        ``init`` returned (``None`` without ``init``).
      init: optional ``init(params, key) -> state``, run once before the first step (e.g. a random
        teacher's parameters, the key of fixed random labels). Pure: works on
        ``jax.ShapeDtypeStruct`` params under ``jax.eval_shape``.
      schedule: optional ``schedule(progress) -> factor``: the term enters the loss as
        ``weight * factor * value`` (e.g. l1's linearly decaying weight).
      uses_reference: whether ``fn`` reads ``ctx.ref_params`` (the method then keeps a frozen copy
        of the parameters it started from).
      classification_only: whether the term needs class probabilities (checked at ``init``).
      label: how the term prints, e.g. ``"npo(beta=0.1)"``.
      hparams: the term's hyper-parameters, for records.
    """

    name: str
    side: str
    fn: TermFn
    init: TermInit | None = None
    schedule: Callable[[jax.Array], jax.Array] | None = None
    uses_reference: bool = False
    classification_only: bool = False
    label: str = ""
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _validate.one_of("term side", self.side, SIDES)
        if not callable(self.fn):
            raise TypeError(f"Term {self.name!r}: fn must be callable, got {self.fn!r}.")
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def __repr__(self) -> str:
        return f"Term({self.label}, side={self.side!r})"

    # Arithmetic: a term is the objective ``1.0 * term``.
    def as_objective(self) -> Objective:
        return Objective.of([(1.0, self)])

    def __add__(self, other):
        return self.as_objective() + other

    def __radd__(self, other):
        return other + self.as_objective() if not _is_zero(other) else self.as_objective()

    def __sub__(self, other):
        return self.as_objective() - other

    def __rsub__(self, other):
        return -self.as_objective() + other

    def __mul__(self, weight):
        return self.as_objective() * weight

    __rmul__ = __mul__

    def __neg__(self):
        return -self.as_objective()


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _as_objective(value: Any, op: str) -> Objective:
    if isinstance(value, Objective):
        return value
    if isinstance(value, Term):
        return value.as_objective()
    raise TypeError(
        f"cannot {op} an objective and {type(value).__name__} {value!r}; objectives combine with "
        "terms, objectives, and (for *) numbers, e.g. `npo(beta=0.1) + 1.0 * retain_loss()`."
    )


def _check_weight(weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.number):
        raise TypeError(
            f"a term's weight must be a Python number, got {type(weight).__name__} {weight!r}."
        )
    if not math.isfinite(weight):
        raise ValueError(f"a term's weight must be finite, got weight={weight!r}.")
    return float(weight)


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    r"""A weighted sum of terms, :math:`L(\theta) = \sum_j w_j\, s_j(t)\, \ell_j(\theta; \text{ctx})`.

    Build with ``+``, ``-`` and ``*`` on :class:`Term`\ s; do not construct directly. Terms keep their
    order; a term name that occurs twice gets a ``#2`` suffix in the metrics.

    Attributes:
      terms: ``((weight, term), ...)``.
      labels: the unique metric key of each term.
    """

    terms: tuple[tuple[float, Term], ...]
    labels: tuple[str, ...]

    @classmethod
    def of(cls, pairs) -> Objective:
        """An objective from ``[(weight, term), ...]``, assigning unique labels."""
        pairs = tuple((_check_weight(w), t) for w, t in pairs)
        for _, t in pairs:
            if not isinstance(t, Term):
                raise TypeError(f"objective terms must be Term instances, got {t!r}.")
        labels, seen = [], {}
        for _, t in pairs:
            seen[t.name] = seen.get(t.name, 0) + 1
            labels.append(t.name if seen[t.name] == 1 else f"{t.name}#{seen[t.name]}")
        return cls(pairs, tuple(labels))

    def __repr__(self) -> str:
        parts = [f"{w!r} * {t.label}" for w, t in self.terms]
        return f"Objective({' + '.join(parts) if parts else '0'})"

    # ---- arithmetic ----------------------------------------------------------------------------
    def __add__(self, other):
        if _is_zero(other):
            return self
        return Objective.of(self.terms + _as_objective(other, "add").terms)

    def __radd__(self, other):
        if _is_zero(other):  # sum([...]) starts from 0
            return self
        return _as_objective(other, "add") + self

    def __sub__(self, other):
        return self + (-_as_objective(other, "subtract"))

    def __rsub__(self, other):
        return _as_objective(other, "subtract") + (-self)

    def __mul__(self, weight):
        w = _check_weight(weight)
        return Objective.of([(w * v, t) for v, t in self.terms])

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1.0

    def as_objective(self) -> Objective:
        """Itself (so code can accept a :class:`Term` or an :class:`Objective` alike)."""
        return self

    # ---- introspection -------------------------------------------------------------------------
    @property
    def sides(self) -> frozenset[str]:
        """The sides the terms act on."""
        return frozenset(t.side for _, t in self.terms)

    @property
    def uses_reference(self) -> bool:
        """Whether some term reads the reference (original) parameters."""
        return any(t.uses_reference for _, t in self.terms)

    @property
    def classification_only(self) -> bool:
        return any(t.classification_only for _, t in self.terms)

    def __len__(self) -> int:
        return len(self.terms)

    def select(self, sides) -> Objective:
        """The sub-objective of the terms on ``sides`` (labels kept, so states still match)."""
        keep = [i for i, (_, t) in enumerate(self.terms) if t.side in sides]
        return Objective(tuple(self.terms[i] for i in keep), tuple(self.labels[i] for i in keep))

    def describe(self) -> list[dict[str, Any]]:
        """JSON-friendly records of the terms: ``[{"term", "weight", "side", <hparams>}, ...]``."""
        return [
            {"term": label, "weight": w, "side": t.side, **dict(t.hparams)}
            for label, (w, t) in zip(self.labels, self.terms, strict=True)
        ]

    # ---- evaluation ----------------------------------------------------------------------------
    def init(self, task: Task, params: Params, key: jax.Array) -> dict[str, Any]:
        """Runs the terms' ``init``; returns ``{label: state}`` for the terms that have one.

        Raises:
          ValueError: a term that needs class probabilities on a task of another kind.
        """
        if self.classification_only and task.kind != CLASSIFICATION:
            names = [
                lab
                for lab, (_, t) in zip(self.labels, self.terms, strict=True)
                if t.classification_only
            ]
            raise ValueError(
                f"terms {names} need class probabilities, but the task is {task.kind!r}."
            )
        states = {}
        keys = jax.random.split(key, max(len(self.terms), 1))
        for i, (label, (_, t)) in enumerate(zip(self.labels, self.terms, strict=True)):
            if t.init is not None:
                states[label] = t.init(params, keys[i])
        return states

    def value(
        self, params: Params, ctx: Context, states: Mapping[str, Any]
    ) -> tuple[jax.Array, Metrics]:
        """``(L(params), {label: unweighted value})``; an empty objective is 0."""
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for label, (w, t) in zip(self.labels, self.terms, strict=True):
            v = jnp.asarray(t.fn(params, ctx, states.get(label)))
            if v.shape != ():
                raise TypeError(f"term {label} must return a scalar, got shape {v.shape}.")
            factor = 1.0 if t.schedule is None else t.schedule(ctx.progress)
            total = total + w * factor * v
            metrics[label] = v
        return total, metrics


def _require(batch: Batch | None, side: str, name: str) -> Batch:
    if batch is None:
        raise ValueError(
            f"term {name} acts on the {side} set, but this step has no {side} batch; give the "
            f"method {side} data."
        )
    return batch


# ---- pure formulas (per-example log-likelihoods in, scalar out) -----------------------------------
def npo_loss(
    log_likelihood: jax.Array,
    ref_log_likelihood: jax.Array,
    beta: float,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Negative preference optimisation on the forget examples.

    .. math::
        L = -\frac{2}{\beta}\,\frac1B \sum_i \log \sigma\bigl(-\beta\,(\log\pi_\theta(y_i|x_i)
            - \log\pi_{\text{ref}}(y_i|x_i))\bigr)

    At :math:`\pi_\theta = \pi_{\text{ref}}` the loss is :math:`\frac{2}{\beta}\log 2` and its gradient is
    that of gradient ascent on :math:`\log\pi_\theta` scaled by 1; as :math:`\pi_\theta(y|x) \to 0` the
    weight :math:`\sigma(\beta \log(\pi_\theta/\pi_{\text{ref}}))` vanishes, so NPO slows down where
    gradient ascent would diverge.

    Args:
      log_likelihood: ``[B]`` :math:`\log\pi_\theta(y_i|x_i)` (sequence log-likelihoods for an LM,
        log-softmax of the label for a classifier; NOT logits).
      ref_log_likelihood: ``[B]`` the same under the reference model (no gradient flows into it).
      beta: inverse temperature > 0.
      mask: optional ``[B]`` row weights (0 on padding rows): the mean is over the real rows.

    Returns:
      The scalar loss.

    References:
      Zhang, Lin, Bai, Mei. Negative Preference Optimization: From Catastrophic Collapse to Effective
      Unlearning. COLM 2024 (arXiv:2404.05868), eq. (3).
    """
    log_ratio = log_likelihood - jax.lax.stop_gradient(ref_log_likelihood)
    return -(2.0 / beta) * _mean(jax.nn.log_sigmoid(-beta * log_ratio), mask)


def simnpo_loss(
    log_likelihood: jax.Array,
    lengths: jax.Array,
    beta: float,
    gamma: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Reference-free, length-normalised NPO (SimNPO).

    .. math::
        L = -\frac{2}{\beta}\,\frac1B \sum_i \log \sigma\Bigl(-\frac{\beta}{|y_i|}\log\pi_\theta(y_i|x_i)
            - \gamma\Bigr)

    Args:
      log_likelihood: ``[B]`` :math:`\log\pi_\theta(y_i|x_i)` (NOT logits).
      lengths: ``[B]`` :math:`|y_i|`: 1 for a classifier, the number of answer tokens for a sequence.
      beta: inverse temperature > 0.
      gamma: reward margin >= 0.
      mask: optional ``[B]`` row weights (0 on padding rows).

    Returns:
      The scalar loss.

    References:
      Fan, Liu, Lin, Jia, Zhang, Mei, Liu. Simplicity Prevails: Rethinking Negative Preference
      Optimization for LLM Unlearning. 2024 (arXiv:2410.07163), eq. (4).
    """
    lengths = jnp.asarray(lengths, log_likelihood.dtype)
    # A padding row (or an answer without tokens) has length 0: divide by 1 there; its weight is 0.
    safe = jnp.where(lengths > 0, lengths, 1.0)
    return -(2.0 / beta) * _mean(jax.nn.log_sigmoid(-(beta / safe) * log_likelihood - gamma), mask)


def _mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    return jnp.mean(values) if mask is None else masked_mean(values, mask)


def kl_divergence(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float
) -> jax.Array:
    r"""Per-example :math:`T^2\,\mathrm{KL}(p_t \,\|\, p_s)` of temperature-softened softmaxes, ``[B]``.

    .. math::
        p = \operatorname{softmax}(z / T), \qquad
        T^2 \sum_k p_{t,k} (\log p_{t,k} - \log p_{s,k})

    (Hinton et al.'s distillation loss; the :math:`T^2` keeps gradient magnitudes comparable across
    temperatures.) Shapes: logits ``[B, K]``.
    """
    log_pt = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return temperature**2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def example_log_likelihood(task: Task, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    r"""Per-example log-likelihoods and lengths of a batch under ``task``'s model.

    For classification :math:`\log\pi(y|x) = \log\operatorname{softmax}(f(x))_y = -\text{CE}`, for
    regression :math:`-\tfrac12\lVert f(x) - y\rVert^2` (the Gaussian log-density with unit variance up
    to a constant, which cancels in NPO's ratio but not in SimNPO), lengths 1; for a sequence model
    the log-likelihood of the weighted (answer) tokens
    :math:`\sum_t w_t \log\pi(y_t | x_{\le t})` and lengths :math:`|y| = \sum_t w_t`.

    Returns:
      ``(log_pi [B], lengths [B])``.
    """
    log_pi = -task.batch_losses(params, batch)
    return log_pi, task.batch_lengths(batch).astype(log_pi.dtype)


# ---- term factories ------------------------------------------------------------------------------
def retain_loss() -> Term:
    r"""The task loss on the retain batch, :math:`\frac1B\sum_{i\in D_r}\ell(z_i;\theta)`.

    Cross-entropy for classification, half squared error for regression (:class:`~unlearn_jax.Task`).
    Minimising it alone is fine-tuning (FT).
    """

    def fn(params, ctx, state):
        del state
        return ctx.task.batch_loss(params, _require(ctx.retain, RETAIN, "retain/loss"))

    return Term("retain/loss", RETAIN, fn, label="retain_loss()")


retain_ce = retain_loss
"""Alias of :func:`retain_loss` (the task loss is the cross-entropy for a classifier)."""


def forget_loss() -> Term:
    r"""The task loss on the forget batch, :math:`\frac1B\sum_{i\in D_f}\ell(z_i;\theta)`.

    Enters objectives negated: ``-forget_loss()`` is gradient ascent, ``-forget_loss() + retain_loss()``
    GradDiff. Its logged value is the (positive) loss.
    """

    def fn(params, ctx, state):
        del state
        return ctx.task.batch_loss(params, _require(ctx.forget, FORGET, "forget/loss"))

    return Term("forget/loss", FORGET, fn, label="forget_loss()")


def _wrong_labels(key: jax.Array, labels: jax.Array, ids: jax.Array | None, num_classes: int):
    """Uniform labels in ``[0, K) \\ {y}``: ``(y + 1 + r) mod K``, ``r ~ U{0, ..., K-2}``."""
    if ids is None:
        offsets = jax.random.randint(key, labels.shape, 0, num_classes - 1)
    else:
        offsets = jax.vmap(
            lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes - 1)
        )(ids)
    return (labels + 1 + offsets) % num_classes


def random_labels(*, fixed: bool = True) -> Term:
    r"""Cross-entropy on the forget batch against random WRONG labels.

    .. math::
        \frac1B \sum_{i \in D_f} \text{CE}(f_\theta(x_i), \tilde y_i), \qquad
        \tilde y_i \sim \mathcal U(\{0,\dots,K-1\} \setminus \{y_i\})

    Args:
      fixed: if True (default, as SalUn's code relabels the forget set once), each example keeps one
        random label for the whole run, drawn from a key fixed at ``init`` and the example's ``"id"``;
        if False, labels are redrawn at every step. A batch without ``"id"`` is relabelled every step.

    References:
      Golatkar, Achille, Soatto. Eternal Sunshine of the Spotless Net. CVPR 2020 (random-label
      baseline); Graves, Nagisetty, Ganesh. Amnesiac Machine Learning. AAAI 2021.
    """

    def init(params, key):
        del params
        return key

    def fn(params, ctx, state):
        batch = _require(ctx.forget, FORGET, "forget/random_labels")
        logits = ctx.task.batch_outputs(params, batch)
        num_classes = logits.shape[-1]
        if num_classes < 2:
            raise ValueError(f"random wrong labels need >= 2 classes, the model has {num_classes}.")
        ids = batch.get("id") if fixed else None
        key = state if ids is not None else jax.random.fold_in(ctx.key, 0x5EED)
        wrong = _wrong_labels(key, batch["y"], ids, num_classes)
        return masked_mean(ctx.task.output_losses(logits, wrong), row_mask(batch))

    return Term(
        "forget/random_labels",
        FORGET,
        fn,
        init=init if fixed else None,
        classification_only=True,
        label=f"random_labels(fixed={fixed})",
        hparams={"fixed": fixed},
    )


def npo(beta: float = 0.1, *, log_likelihood: LogLikelihoodFn = example_log_likelihood) -> Term:
    r"""NPO on the forget batch against the model before unlearning (see :func:`npo_loss`).

    Args:
      beta: inverse temperature > 0 (the paper's default 0.1).
      log_likelihood: ``(task, params, batch) -> (log_pi [B], lengths [B])``; the default reads the
        task's per-example loss (log-softmax of the label). A sequence model passes its summed token
        log-likelihood here.

    References:
      Zhang, Lin, Bai, Mei. Negative Preference Optimization. COLM 2024 (arXiv:2404.05868).
    """
    _validate.positive(beta=beta)

    def fn(params, ctx, state):
        del state
        batch = _require(ctx.forget, FORGET, "forget/npo")
        log_pi, _ = log_likelihood(ctx.task, params, batch)
        ref_log_pi, _ = log_likelihood(ctx.task, ctx.ref_params, batch)
        return npo_loss(log_pi, ref_log_pi, beta, row_mask(batch, log_pi.dtype))

    return Term(
        "forget/npo",
        FORGET,
        fn,
        uses_reference=True,
        label=f"npo(beta={beta!r})",
        hparams={"beta": beta},
    )


def simnpo(
    beta: float = 2.5,
    gamma: float = 0.0,
    *,
    log_likelihood: LogLikelihoodFn = example_log_likelihood,
) -> Term:
    r"""SimNPO on the forget batch (see :func:`simnpo_loss`); needs no reference model.

    Args:
      beta: inverse temperature > 0 (the paper uses 2.5-4.5).
      gamma: reward margin >= 0 (the paper's default 0).
      log_likelihood: as for :func:`npo`; its lengths are :math:`|y|`.

    References:
      Fan et al. Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning.
      2024 (arXiv:2410.07163).
    """
    _validate.positive(beta=beta)
    _validate.non_negative(gamma=gamma)

    def fn(params, ctx, state):
        del state
        batch = _require(ctx.forget, FORGET, "forget/simnpo")
        log_pi, lengths = log_likelihood(ctx.task, params, batch)
        return simnpo_loss(log_pi, lengths, beta, gamma, row_mask(batch, log_pi.dtype))

    return Term(
        "forget/simnpo",
        FORGET,
        fn,
        label=f"simnpo(beta={beta!r}, gamma={gamma!r})",
        hparams={"beta": beta, "gamma": gamma},
    )


# ---- distillation --------------------------------------------------------------------------------
def reinit_params(params: Params, key: jax.Array) -> Params:
    """Fresh parameters with the shapes and dtypes of ``params``, as Flax initialises Dense/Conv layers.

    Leaves with ``ndim >= 2`` (kernels ``[..., fan_in, fan_out]``) get LeCun-normal draws (Flax's
    default kernel initialiser, fan-in = product of all but the last axis); 1-D leaves whose path ends
    in ``scale`` (normalisation scales) get ones; other leaves (biases, scalars) get zeros. For other
    initialisations pass your own ``teacher_init`` (e.g. ``lambda k: model.init(k, x)["params"]``).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    init = jax.nn.initializers.lecun_normal()
    out = []
    for (path, leaf), k in zip(leaves, keys, strict=False):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        last = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1]))) if path else ""
        if len(shape) >= 2:
            out.append(init(k, shape, dtype))
        elif last == "scale":
            out.append(jnp.ones(shape, dtype))
        else:
            out.append(jnp.zeros(shape, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _distill(side: str, teacher: str, temperature: float, teacher_init) -> Term:
    _validate.positive(temperature=temperature)
    _validate.one_of("teacher", teacher, ("original", "random"))
    if teacher_init is not None and teacher != "random":
        raise ValueError("teacher_init only applies to teacher='random'.")
    name = f"{side}/kl" if teacher == "original" else f"{side}/kl_random_teacher"

    def init(params, key):
        if teacher_init is not None:
            return teacher_init(key)
        return reinit_params(params, key)

    def fn(params, ctx, state):
        batch = _require(ctx.forget if side == FORGET else ctx.retain, side, name)
        teacher_params = ctx.ref_params if teacher == "original" else state
        teacher_logits = jax.lax.stop_gradient(ctx.task.batch_outputs(teacher_params, batch))
        student_logits = ctx.task.batch_outputs(params, batch)
        kl = kl_divergence(teacher_logits, student_logits, temperature)
        return masked_mean(kl, row_mask(batch, kl.dtype))

    fn_name = "forget_kl" if side == FORGET else "retain_kl"
    return Term(
        name,
        side,
        fn,
        init=init if teacher == "random" else None,
        uses_reference=teacher == "original",
        classification_only=True,
        label=f"{fn_name}(temperature={temperature!r}, teacher={teacher!r})",
        hparams={"temperature": temperature, "teacher": teacher},
    )


def retain_kl(
    temperature: float = 1.0,
    *,
    teacher: str = "original",
    teacher_init: Callable[[jax.Array], Params] | None = None,
) -> Term:
    r"""Distillation on the retain batch: :math:`\frac{T^2}{B}\sum_i \mathrm{KL}(p_{\text{teacher}}(x_i)
    \,\|\, p_\theta(x_i))` with temperature-``T`` softmaxes (see :func:`kl_divergence`).

    Args:
      temperature: ``T > 0``.
      teacher: ``"original"`` (the model before unlearning; SCRUB's min-steps, Bad Teacher's retain
        part) or ``"random"`` (a randomly initialised model of the same shapes, see ``teacher_init``).
      teacher_init: ``key -> params`` for the random teacher; default :func:`reinit_params`.
    """
    return _distill(RETAIN, teacher, temperature, teacher_init)


def forget_kl(
    temperature: float = 1.0,
    *,
    teacher: str = "original",
    teacher_init: Callable[[jax.Array], Params] | None = None,
) -> Term:
    r"""Distillation on the forget batch, as :func:`retain_kl` but on the forget side.

    ``-forget_kl(T)`` pushes the student AWAY from the original (SCRUB's max-steps);
    ``forget_kl(teacher="random")`` pulls it towards a randomly initialised model (Bad Teacher).
    """
    return _distill(FORGET, teacher, temperature, teacher_init)


def _linear_decay(progress: jax.Array) -> jax.Array:
    return 1.0 - progress


def l1_norm(*, decay: str = "linear") -> Term:
    r"""The l1 norm of all parameters, :math:`\lVert\theta\rVert_1 = \sum_j |\theta_j|`, with a schedule.

    With ``decay="linear"`` the term enters the loss as :math:`w\,(1 - t/T)\,\lVert\theta\rVert_1` at
    step :math:`t` of :math:`T`: the l1-sparse recipe's linearly decaying :math:`\gamma_t`. With
    ``"constant"`` the factor is 1. The logged value is the norm itself.

    References:
      Jia, Liu, Ram, Yao, Liu, Liu, Sharma, Liu. Model Sparsity Can Simplify Machine Unlearning.
      NeurIPS 2023 (arXiv:2304.04934).
    """
    _validate.one_of("l1 decay", decay, ("linear", "constant"))

    def fn(params, ctx, state):
        del ctx, state
        return sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(params))

    return Term(
        "params/l1",
        PARAMS,
        fn,
        schedule=_linear_decay if decay == "linear" else None,
        label=f"l1_norm(decay={decay!r})",
        hparams={"decay": decay},
    )


__all__ = [
    "FORGET",
    "PARAMS",
    "RETAIN",
    "Context",
    "Objective",
    "Term",
    "example_log_likelihood",
    "forget_kl",
    "forget_loss",
    "kl_divergence",
    "l1_norm",
    "npo",
    "npo_loss",
    "random_labels",
    "reinit_params",
    "retain_ce",
    "retain_kl",
    "simnpo",
    "simnpo_loss",
]
