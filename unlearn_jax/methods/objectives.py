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
from unlearn_jax.core.task import CLASSIFICATION, SEQUENCE, Task

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


# ---- language models: alternate answers, sequence KL, representation steering -------------------
def dpo_loss(
    chosen_log_likelihood: jax.Array,
    chosen_ref_log_likelihood: jax.Array,
    rejected_log_likelihood: jax.Array,
    rejected_ref_log_likelihood: jax.Array,
    beta: float,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Direct preference optimisation of a chosen answer :math:`a_w` over a rejected one :math:`a_l`.

    .. math::
        L = -\frac{2}{\beta}\,\frac1B \sum_i \log \sigma\Bigl(\beta\Bigl[
            \log\frac{\pi_\theta(a_{w,i}|x_i)}{\pi_{\text{ref}}(a_{w,i}|x_i)}
            - \log\frac{\pi_\theta(a_{l,i}|x_i)}{\pi_{\text{ref}}(a_{l,i}|x_i)}\Bigr]\Bigr)

    with sequence log-likelihoods (summed over the answer tokens). Rafailov et al.'s loss is
    :math:`\tfrac{\beta}{2}` times this one (same minimisers); the :math:`2/\beta` scaling is the
    NPO paper's and its code's for IdkDPO (and open-unlearning's), so that, like NPO, its gradient
    at :math:`\pi_\theta = \pi_{\text{ref}}` is that of :math:`\log\pi_\theta(a_w|x) -
    \log\pi_\theta(a_l|x)` with weight 1. Dropping the chosen answer gives NPO
    (:func:`npo_loss`).

    Args:
      chosen_log_likelihood: ``[B]`` :math:`\log\pi_\theta(a_w|x)` (e.g. a refusal, "I don't know").
      chosen_ref_log_likelihood: ``[B]`` the same under the reference (no gradient flows into it).
      rejected_log_likelihood: ``[B]`` :math:`\log\pi_\theta(a_l|x)` (the answer to forget).
      rejected_ref_log_likelihood: ``[B]`` the same under the reference.
      beta: inverse temperature > 0.
      mask: optional ``[B]`` row weights (0 on padding rows).

    Returns:
      The scalar loss; :math:`\frac{2}{\beta}\log 2` at :math:`\pi_\theta = \pi_{\text{ref}}`.

    References:
      Rafailov, Sharma, Mitchell, Ermon, Manning, Finn. Direct Preference Optimization: Your Language
      Model is Secretly a Reward Model. NeurIPS 2023 (arXiv:2305.18290), eq. (7). Zhang, Lin, Bai,
      Mei. Negative Preference Optimization. COLM 2024 (arXiv:2404.05868), the IdkDPO baseline on
      TOFU.
    """
    stop = jax.lax.stop_gradient
    chosen = chosen_log_likelihood - stop(chosen_ref_log_likelihood)
    rejected = rejected_log_likelihood - stop(rejected_ref_log_likelihood)
    return -(2.0 / beta) * _mean(jax.nn.log_sigmoid(beta * (chosen - rejected)), mask)


def _token_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """``[B]`` per-row :math:`\\sum_t w_t v_t / \\sum_t w_t` of ``values [B, T]`` (0 for a row
    without weighted tokens)."""
    weights = weights.astype(values.dtype)
    total = jnp.sum(weights, axis=-1)
    return jnp.sum(weights * values, axis=-1) / jnp.where(total > 0, total, 1.0)


def sequence_kl_divergence(
    ref_logits: jax.Array, logits: jax.Array, weights: jax.Array, temperature: float = 1.0
) -> jax.Array:
    r"""Per-sequence mean over the weighted tokens of :math:`T^2\,\mathrm{KL}(p_{\text{ref},t}\,\|\,
    p_{\theta,t})`, the next-token distributions of the reference and the model, ``[B]``:

    .. math::
        \mathrm{KL}_i = \frac{\sum_t w_{it}\, T^2 \sum_v p_{\text{ref},itv}
            (\log p_{\text{ref},itv} - \log p_{\theta,itv})}{\sum_t w_{it}}, \qquad
        p_{\cdot,it} = \operatorname{softmax}(z_{\cdot,it} / T).

    Args:
      ref_logits: ``[B, T, V]`` the reference (teacher) logits.
      logits: ``[B, T, V]`` the model's.
      weights: ``[B, T]`` token weights (1 on the answer tokens).
      temperature: ``T > 0``.

    Returns:
      ``[B]``; 0 for a row without weighted tokens.
    """
    per_token = kl_divergence(
        ref_logits.reshape(-1, ref_logits.shape[-1]),
        logits.reshape(-1, logits.shape[-1]),
        temperature,
    ).reshape(logits.shape[:-1])
    return _token_mean(per_token, weights)


def retain_sequence_kl(temperature: float = 1.0) -> Term:
    r"""KL to the model before unlearning on the retain batch of a sequence model:
    :math:`\frac1B\sum_{i\in D_r}\mathrm{KL}_i` (:func:`sequence_kl_divergence`, answer tokens).

    The "KL" retain regulariser of TOFU's GA/GradDiff/NPO variants (``npo_KL``, ``dpo_KL``), which
    keeps the whole next-token distribution, not only the likelihood of the retain answers. TOFU's
    code averages over every position of the padded batch (prompt and padding included); here the
    mean is over the answer tokens of each row, then over the real rows.

    Args:
      temperature: ``T > 0``.

    References:
      Maini, Feng, Schwarzschild, Lipton, Kolter. TOFU: A Task of Fictitious Unlearning for LLMs.
      2024 (arXiv:2401.06121); Zhang et al. NPO (arXiv:2404.05868), NPO+KL.
    """
    _validate.positive(temperature=temperature)

    def fn(params, ctx, state):
        del state
        batch = _require(ctx.retain, RETAIN, "retain/sequence_kl")
        _require_sequence(ctx.task, "retain_sequence_kl")
        teacher = jax.lax.stop_gradient(ctx.task.batch_outputs(ctx.ref_params, batch))
        kl = sequence_kl_divergence(
            teacher, ctx.task.batch_outputs(params, batch), batch["weights"], temperature
        )
        return masked_mean(kl, row_mask(batch, kl.dtype))

    return Term(
        "retain/sequence_kl",
        RETAIN,
        fn,
        uses_reference=True,
        label=f"retain_sequence_kl(temperature={temperature!r})",
        hparams={"temperature": temperature},
    )


def _require_sequence(task: Task, name: str) -> None:
    if task.kind != SEQUENCE:
        raise ValueError(f"{name} needs a sequence task (token weights), got {task.kind!r}.")


class AnswerTable(NamedTuple):
    r"""Alternate answers to the forget questions, looked up by example id inside jitted steps.

    Row ``j`` holds an encoded pair (the question of example ``ids[j]`` with another answer, e.g. a
    refusal), sorted by id. Build with :func:`answer_table`.

    Attributes:
      ids: ``[N]`` int32, sorted, unique.
      x, y: ``[N, T]`` int32 input and target tokens.
      weights: ``[N, T]`` float32 token weights (1 on the alternate answer's tokens).
    """

    ids: jax.Array
    x: jax.Array
    y: jax.Array
    weights: jax.Array


def answer_table(answers: Any) -> AnswerTable:
    """The :class:`AnswerTable` of a sequence dataset of alternate answers (host arrays).

    Args:
      answers: a sequence :class:`~unlearn_jax.data.Dataset` whose ids are those of the forget
        examples it answers (e.g. ``FactsData.with_answers(ids, refusals)``).

    Raises:
      TypeError: not a dataset with ``x``, ``y``, ``ids`` and token ``weights``.
      ValueError: an empty dataset.
    """
    weights = getattr(answers, "weights", None)
    if weights is None or not all(hasattr(answers, a) for a in ("x", "y", "ids")):
        raise TypeError(
            "alternate answers must be a sequence Dataset (x, y, ids and token weights), e.g. "
            f"FactsData.with_answers(ids, REFUSALS...); got {type(answers).__name__}."
        )
    ids = np.asarray(answers.ids, np.int64)
    if ids.size == 0:
        raise ValueError("the alternate answers are empty; give one per forget example.")
    order = np.argsort(ids, kind="stable")
    return AnswerTable(
        ids=ids[order].astype(np.int32),
        x=np.asarray(answers.x, np.int32)[order],
        y=np.asarray(answers.y, np.int32)[order],
        weights=np.asarray(weights, np.float32)[order],
    )


def lookup_answers(table: AnswerTable, batch: Batch) -> Batch:
    r"""The alternate-answer batch of a forget batch: row ``i`` is the table's row with id
    ``batch["id"][i]``, with row weight ``mask_i`` if that id is in the table and 0 otherwise.

    A binary search on the sorted ids (``jnp.searchsorted``): jittable, one gather per array.

    Returns:
      ``{"x", "y", "weights", "id", "mask"}``, each with the batch's ``B`` rows.
    """
    ids = batch["id"].astype(jnp.int32)
    pos = jnp.clip(jnp.searchsorted(table.ids, ids), 0, table.ids.shape[0] - 1)
    found = (table.ids[pos] == ids) & (ids >= 0)
    return {
        "x": table.x[pos],
        "y": table.y[pos],
        "weights": table.weights[pos],
        "id": ids,
        "mask": row_mask(batch) * found.astype(jnp.float32),
    }


def _answer_term(name: str, answers: Any, fn, *, label: str, hparams: dict, reference: bool):
    table = answer_table(answers)

    def init(params, key):
        del params, key
        return AnswerTable(*(jnp.asarray(a) for a in table))

    return Term(
        name,
        FORGET,
        fn,
        init=init,
        uses_reference=reference,
        label=label,
        hparams={**hparams, "answers": int(table.ids.shape[0])},
    )


def idk_nll(answers: Any) -> Term:
    r"""Fine-tuning on alternate answers to the forget questions (TOFU's "IdK", open-unlearning's
    IdkNLL): :math:`\frac1B\sum_{i\in D_f} -\log\pi_\theta(\tilde a_i|x_i)`, with :math:`\tilde a_i`
    the alternate (refusal) answer of forget example :math:`i` and the task's sequence loss
    (summed over the answer tokens).

    Args:
      answers: a sequence dataset holding, for each forget id, its question with the alternate
        answer (e.g. ``FactsData.with_answers(ids, refusals)``); looked up by ``batch["id"]``
        (:func:`lookup_answers`). A forget id without an answer contributes nothing.

    References:
      Maini et al. TOFU: A Task of Fictitious Unlearning for LLMs. 2024 (arXiv:2401.06121), the
      "I don't know" baseline.
    """

    def fn(params, ctx, state):
        batch = _require(ctx.forget, FORGET, "forget/idk_nll")
        _require_sequence(ctx.task, "idk_nll")
        return ctx.task.batch_loss(params, lookup_answers(state, batch))

    return _answer_term(
        "forget/idk_nll", answers, fn, label="idk_nll()", hparams={}, reference=False
    )


def idk_dpo(answers: Any, beta: float = 0.1, *, log_likelihood=example_log_likelihood) -> Term:
    r"""IdkDPO: prefer the alternate (refusal) answer :math:`\tilde a_i` over the forget answer
    :math:`a_i` (:func:`dpo_loss` with :math:`a_w = \tilde a_i`, :math:`a_l = a_i`, the reference
    being the model before unlearning).

    Args:
      answers: alternate answers looked up by id, as for :func:`idk_nll`.
      beta: inverse temperature > 0 (0.1 in the NPO paper's TOFU runs).
      log_likelihood: ``(task, params, batch) -> (log_pi [B], lengths [B])`` (sequence
        log-likelihoods by default).

    References:
      Rafailov et al. DPO. NeurIPS 2023; Zhang, Lin, Bai, Mei. NPO. COLM 2024 (arXiv:2404.05868);
      Maini et al. TOFU. 2024.
    """
    _validate.positive(beta=beta)

    def fn(params, ctx, state):
        batch = _require(ctx.forget, FORGET, "forget/idk_dpo")
        _require_sequence(ctx.task, "idk_dpo")
        alternate = lookup_answers(state, batch)
        chosen, _ = log_likelihood(ctx.task, params, alternate)
        chosen_ref, _ = log_likelihood(ctx.task, ctx.ref_params, alternate)
        rejected, _ = log_likelihood(ctx.task, params, batch)
        rejected_ref, _ = log_likelihood(ctx.task, ctx.ref_params, batch)
        mask = alternate["mask"].astype(chosen.dtype)
        return dpo_loss(chosen, chosen_ref, rejected, rejected_ref, beta, mask)

    label = f"idk_dpo(beta={beta!r})"
    return _answer_term(
        "forget/idk_dpo", answers, fn, label=label, hparams={"beta": beta}, reference=True
    )


HiddenStatesFn = Callable[[Task, Params, jax.Array], jax.Array]
"""``hidden_states(task, params, x [B, T]) -> [B, T, D]``: a layer's activations."""


def module_hidden_states(layer: int) -> HiddenStatesFn:
    """The residual stream after ``layer`` blocks, read from ``task.module.hidden_states`` (the
    transformer of :mod:`unlearn_jax.models.transformer`; ``task`` from ``model_task(model)``).

    Raises:
      ValueError: at trace time, if the task has no module with a ``hidden_states`` method.
    """
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or layer < 0:
        raise ValueError(f"layer must be an integer >= 0, got {layer=!r}.")
    layer = int(layer)

    def hidden(task, params, x):
        module = task.module
        method = getattr(type(module), "hidden_states", None) if module is not None else None
        if method is None:
            raise ValueError(
                f"RMU reads a layer's activations, but the task's module ({type(module).__name__}) "
                "has no hidden_states method; build the task with models.model_task(model) for "
                "a TransformerLM, or pass hidden_states=(task, params, x) -> [B, T, D]."
            )
        return module.apply({"params": params}, x, layer, method=method)

    return hidden


def steering_loss(
    hidden: jax.Array, target: jax.Array, weights: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    r"""RMU's activation loss: the squared distance of each token's activation to its target,
    averaged over the weighted tokens of each sequence, then over the sequences:

    .. math::
        L = \frac1B \sum_i \frac{\sum_t w_{it}\,\lVert h_{it} - g_{it}\rVert_2^2}{\sum_t w_{it}}.

    Args:
      hidden: ``[B, T, D]`` activations :math:`h`.
      target: broadcastable to ``[B, T, D]``: :math:`c\,u` (``[D]``) for the forget loss, the
        frozen model's activations (``[B, T, D]``) for the retain loss.
      weights: ``[B, T]`` token weights :math:`w` (1 on the tokens that count).
      mask: optional ``[B]`` row weights (0 on padding rows).

    Returns:
      The scalar loss. (The WMDP code's ``mse_loss`` also averages over the ``D`` coordinates:
      :math:`1/D` times this.)
    """
    # Explicit: a [D] target meets [B, T, D] activations (no implicit rank promotion).
    target = jnp.broadcast_to(target, hidden.shape)
    per_token = jnp.sum(jnp.square(hidden - target), axis=-1)
    return _mean(_token_mean(per_token, weights), mask)


def rmu_direction(key: jax.Array, dim: int, dtype: Any = jnp.float32) -> jax.Array:
    r"""RMU's fixed random direction: :math:`u = r / \lVert r\rVert_2`, :math:`r_j \sim
    \mathcal U[0, 1)` independently, ``[dim]``."""
    r = jax.random.uniform(key, (dim,), dtype)
    return r / jnp.linalg.norm(r)


def rmu_forget(
    layer: int, coefficient: float, *, hidden_states: HiddenStatesFn | None = None
) -> Term:
    r"""RMU's forget loss: steer the activations of layer :math:`\ell` on the forget batch towards a
    scaled fixed random direction, :func:`steering_loss` with target :math:`c\,u`
    (:func:`rmu_direction`), averaged over the answer tokens (``batch["weights"]``).

    :math:`u` is drawn at ``init`` from the method's key (the state holds that key; :math:`u` is
    recomputed from it, identically, at every step, since its size :math:`D` is only known from the
    activations).

    Args:
      layer: :math:`\ell`, activations after this many blocks (``TransformerLM.hidden_states``).
      coefficient: :math:`c > 0` (6.5 for Zephyr-7B in the paper; it should exceed the typical norm
        of the layer's activations).
      hidden_states: ``(task, params, x) -> [B, T, D]``; default :func:`module_hidden_states`.

    References:
      Li et al. The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning. ICML 2024
      (arXiv:2403.03218), section 5 (RMU).
    """
    _validate.positive(coefficient=coefficient)
    hidden_fn = hidden_states or module_hidden_states(layer)

    def init(params, key):
        del params
        return key

    def fn(params, ctx, state):
        batch = _require(ctx.forget, FORGET, "forget/rmu")
        h = hidden_fn(ctx.task, params, batch["x"])
        target = coefficient * rmu_direction(state, h.shape[-1], h.dtype)
        return steering_loss(h, target, batch["weights"], row_mask(batch, h.dtype))

    return Term(
        "forget/rmu",
        FORGET,
        fn,
        init=init,
        label=f"rmu_forget(layer={layer!r}, coefficient={coefficient!r})",
        hparams={"layer": layer, "coefficient": coefficient},
    )


def rmu_retain(layer: int, *, hidden_states: HiddenStatesFn | None = None) -> Term:
    r"""RMU's retain loss: keep the activations of layer :math:`\ell` on the retain batch equal to
    the frozen model's (the model before unlearning), :func:`steering_loss` with target
    :math:`h^{\text{frozen}}`, over the answer tokens.

    Args:
      layer: :math:`\ell`, as for :func:`rmu_forget`.
      hidden_states: ``(task, params, x) -> [B, T, D]``; default :func:`module_hidden_states`.

    References:
      Li et al. The WMDP Benchmark. ICML 2024 (arXiv:2403.03218).
    """
    hidden_fn = hidden_states or module_hidden_states(layer)

    def fn(params, ctx, state):
        del state
        batch = _require(ctx.retain, RETAIN, "retain/rmu")
        frozen = jax.lax.stop_gradient(hidden_fn(ctx.task, ctx.ref_params, batch["x"]))
        h = hidden_fn(ctx.task, params, batch["x"])
        return steering_loss(h, frozen, batch["weights"], row_mask(batch, h.dtype))

    return Term(
        "retain/rmu",
        RETAIN,
        fn,
        uses_reference=True,
        label=f"rmu_retain(layer={layer!r})",
        hparams={"layer": layer},
    )


__all__ = [
    "FORGET",
    "PARAMS",
    "RETAIN",
    "AnswerTable",
    "Context",
    "HiddenStatesFn",
    "Objective",
    "Term",
    "answer_table",
    "dpo_loss",
    "example_log_likelihood",
    "forget_kl",
    "forget_loss",
    "idk_dpo",
    "idk_nll",
    "kl_divergence",
    "l1_norm",
    "lookup_answers",
    "module_hidden_states",
    "npo",
    "npo_loss",
    "random_labels",
    "reinit_params",
    "retain_ce",
    "retain_kl",
    "retain_sequence_kl",
    "rmu_direction",
    "rmu_forget",
    "rmu_retain",
    "sequence_kl_divergence",
    "simnpo",
    "simnpo_loss",
    "steering_loss",
]
