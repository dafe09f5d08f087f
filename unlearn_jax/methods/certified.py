r"""Certified removal for L2-regularised linear (logistic) models: Guo, Goldstein, Hannun, van der Maaten.

A removal mechanism :math:`M` is :math:`(\epsilon, \delta)`-certified (CR) for a learning algorithm
:math:`A` if for every data set :math:`D`, removed point :math:`z \in D` and set of models
:math:`T`: :math:`P(M(A(D), D, z) \in T) \le e^\epsilon P(A(D \setminus z) \in T) + \delta` and
vice versa. The mechanism here (paper, Sections 3-4):

**Training with objective perturbation** (sum form, as in the paper; :math:`n` points, features
:math:`\lVert x_i \rVert_2 \le 1`, labels :math:`s_i \in \{-1, +1\}`, one binary classifier per class
for :math:`K > 2` classes)

.. math:: L_b(w; D) = \sum_{i=1}^n \ell(w^\top x_i, s_i) + \frac{\lambda n}{2} \lVert w \rVert_2^2 + b^\top w,
          \qquad b \sim \mathcal N(0, \sigma^2 I_d),

with :math:`\ell(z, s) = \log(1 + e^{-s z})` (the authors' code divides everything by :math:`n`:
mean loss :math:`+ \frac\lambda2 \lVert w\rVert^2 + b^\top w / n`, the same minimiser).

**Removal by one Newton step** on the remaining data :math:`D'` (:math:`m` points removed):

.. math:: w^- = w^* + H^{-1} \Delta, \qquad
          \Delta = \lambda m\, w^* + \sum_{j \in \text{removed}} \nabla_w \ell(w^{*\top} x_j, s_j), \qquad
          H = \sum_{i \in D'} \nabla_w^2 \ell(w^{*\top} x_i, s_i) + \lambda (n - m) I.

**Gradient-residual bounds.** The step leaves a gradient residual
:math:`\lVert \nabla L(w^-; D') \rVert_2` that would reveal the removed data; the noise :math:`b`
masks it as long as it stays below the budget :math:`\epsilon'`:

* worst case (Theorem 1, and its batch form for :math:`m` removals), for losses with
  :math:`\lVert\nabla\ell\rVert \le C` and :math:`\ell''` :math:`\gamma`-Lipschitz (logistic:
  :math:`C = 1`, :math:`\gamma = 1/4` as stated in the paper):
  :math:`\lVert \nabla L(w^-; D') \rVert_2 \le \dfrac{4 \gamma m^2 C^2}{\lambda^2 (n - m)}`;
* data dependent (Corollary, used to decide when to retrain):
  :math:`\lVert \nabla L(w^-; D') \rVert_2 \le \gamma \lVert X' \rVert_2 \lVert H^{-1}\Delta \rVert_2
  \lVert X' H^{-1} \Delta \rVert_2` with :math:`X'` the remaining data matrix. Bounds accumulate
  over successive removals; for :math:`K` one-vs-rest classifiers the bounds of the classifiers
  are summed (the residual of the stacked parameters is at most the sum of the per-class norms),
  as in the authors' code.

**Noise and budget** (Theorem 3, Gaussian objective perturbation): if the accumulated residual is
at most :math:`\epsilon'` and :math:`b \sim \mathcal N(0, \sigma^2 I)` with
:math:`\sigma = c\, \epsilon' / \epsilon`, the removal is :math:`(\epsilon, \delta)`-CR with
:math:`\delta = 1.5\, e^{-c^2/2}`, i.e. :math:`c = \sqrt{2 \ln(1.5/\delta)}`. Equivalently, noise
:math:`\sigma` buys the budget :math:`\epsilon' = \sigma \epsilon / c`. Once the accumulated bound
exceeds it, the model must be retrained from scratch (with fresh noise) on the remaining data.

One addition to the paper: the trained model is not an exact minimiser; its own gradient norm
:math:`\lVert \nabla L_b(w; D) \rVert` (tiny in float64) is counted against the budget from the start.

References:
  Guo, Goldstein, Hannun, van der Maaten. "Certified Data Removal from Machine Learning Models",
  ICML 2020 (Theorem 1, its batch corollary, the data-dependent corollary, Theorem 3).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate

LOGISTIC_GAMMA = 0.25  # Lipschitz constant of l'' for the logistic loss, as the paper states it
LOGISTIC_GRAD_BOUND = 1.0  # C: ||grad l|| <= ||x|| <= 1


# ---- the formulas -----------------------------------------------------------------------------
def gaussian_constant(delta: float) -> float:
    r"""``c = sqrt(2 ln(1.5 / delta))``, from :math:`\delta = 1.5 e^{-c^2/2}` (Theorem 3)."""
    _validate.in_interval("delta", delta, 0.0, 1.0)
    return math.sqrt(2.0 * math.log(1.5 / delta))


def noise_scale(epsilon: float, delta: float, budget: float) -> float:
    r"""The noise standard deviation :math:`\sigma = c\,\epsilon'/\epsilon` for a residual budget :math:`\epsilon'`."""
    _validate.positive(epsilon=epsilon, budget=budget)
    return gaussian_constant(delta) * budget / epsilon


def residual_budget(sigma: float, epsilon: float, delta: float) -> float:
    r"""The gradient-residual budget :math:`\epsilon' = \sigma \epsilon / c` that noise :math:`\sigma` buys."""
    _validate.positive(sigma=sigma, epsilon=epsilon)
    return sigma * epsilon / gaussian_constant(delta)


def worst_case_residual_bound(
    num_removed: int,
    num_train: int,
    lam: float,
    *,
    gamma: float = LOGISTIC_GAMMA,
    grad_bound: float = LOGISTIC_GRAD_BOUND,
) -> float:
    r"""Theorem 1 (batch form): :math:`\lVert\nabla L(w^-; D')\rVert \le 4\gamma m^2 C^2 / (\lambda^2 (n - m))`.

    Args:
      num_removed: :math:`m \ge 1` points removed in one Newton step.
      num_train: :math:`n`, the training-set size before the removal (:math:`n > m`).
      lam: :math:`\lambda > 0`.
      gamma: Lipschitz constant of :math:`\ell''` (logistic: 1/4 as in the paper).
      grad_bound: :math:`C`, a bound on :math:`\lVert\nabla\ell\rVert` (logistic with
        :math:`\lVert x\rVert \le 1`: 1).
    """
    _validate.positive_int(num_removed=num_removed, num_train=num_train)
    _validate.positive(lam=lam, gamma=gamma, grad_bound=grad_bound)
    if num_removed >= num_train:
        raise ValueError(f"cannot remove {num_removed=} of {num_train=} points.")
    m, n = num_removed, num_train
    return 4.0 * gamma * m**2 * grad_bound**2 / (lam**2 * (n - m))


def data_dependent_residual_bound(
    x_remaining: Any, step: Any, *, gamma: float = LOGISTIC_GAMMA
) -> jax.Array:
    r""":math:`\gamma \lVert X' \rVert_2 \lVert H^{-1}\Delta \rVert_2 \lVert X' H^{-1}\Delta \rVert_2`.

    Args:
      x_remaining: :math:`X'`, ``[n', d]`` the remaining data.
      step: :math:`H^{-1}\Delta`, ``[d]`` (one classifier) or ``[d, K]`` (the bound of each column,
        summed).
      gamma: as in :func:`worst_case_residual_bound`.

    Returns:
      The bound, a scalar (summed over classifiers).
    """
    x = jnp.asarray(x_remaining)
    step = jnp.asarray(step)
    step = step[:, None] if step.ndim == 1 else step
    spectral = jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(x.T @ x)))
    per_class = gamma * spectral * jnp.linalg.norm(step, axis=0) * jnp.linalg.norm(x @ step, axis=0)
    return jnp.sum(per_class)


# ---- the model ------------------------------------------------------------------------------------
class CertifiedLinearModel(NamedTuple):
    """A removal-enabled linear classifier and its certification state.

    Attributes:
      weights: ``[d, K]`` one column per one-vs-rest classifier (``K = 1`` for binary).
      noise: ``[d, K]`` the objective-perturbation vector :math:`b` it was trained with.
      lam: :math:`\\lambda`.
      sigma: the noise standard deviation.
      epsilon, delta: the certified removal guarantee targeted.
      gamma: the Lipschitz constant used in the bounds.
      num_train: the current number of training points.
      residual_bound: the accumulated gradient-residual bound since the last (re)training,
        starting at the trained model's own gradient norm.
      num_classes: the number of classes (2 for a binary model with one column).
    """

    weights: jax.Array
    noise: jax.Array
    lam: float
    sigma: float
    epsilon: float
    delta: float
    gamma: float
    num_train: int
    residual_bound: float
    num_classes: int

    @property
    def budget(self) -> float:
        r"""The gradient-residual budget :math:`\epsilon' = \sigma\epsilon/c`."""
        return residual_budget(self.sigma, self.epsilon, self.delta)

    @property
    def certified(self) -> bool:
        """Whether the removals so far are (epsilon, delta)-certified (accumulated bound <= budget)."""
        return self.residual_bound <= self.budget

    def decision_function(self, x: Any) -> jax.Array:
        """Scores ``[n, K] = x @ weights``."""
        return jnp.asarray(x, self.weights.dtype) @ self.weights

    def predict(self, x: Any) -> jax.Array:
        """Class labels ``[n]`` (sign of the score for binary, argmax for one-vs-rest)."""
        scores = self.decision_function(x)
        if self.weights.shape[1] == 1:
            return (scores[:, 0] > 0).astype(jnp.int32)
        return jnp.argmax(scores, axis=1)


class RemovalReport(NamedTuple):
    """What one :func:`certified_remove` call did.

    Attributes:
      step_bound: the data-dependent residual bound of this removal's Newton step.
      residual_bound: the accumulated bound after it (0-based again after a retraining).
      budget: the budget :math:`\\epsilon'`.
      certified: whether the returned model is (epsilon, delta)-certified.
      retrained: whether the budget was exceeded and the model retrained from scratch.
      gradient_residual_norm: the actual :math:`\\lVert\\nabla L(w^-; D')\\rVert` of the Newton step
        (a diagnostic that shows how loose the bound is; it depends on the removed data, so do not
        publish it).
    """

    step_bound: float
    residual_bound: float
    budget: float
    certified: bool
    retrained: bool
    gradient_residual_norm: float


def _signs(y: np.ndarray, num_classes: int) -> np.ndarray:
    if num_classes == 2:
        return (2.0 * y - 1.0)[:, None]
    return np.where(y[:, None] == np.arange(num_classes)[None, :], 1.0, -1.0)


def _check_data(x: Any, y: Any, num_classes: int | None, name: str):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [n, d] features, got shape {x.shape}.")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{name}: y must be [n={x.shape[0]}] integer labels, got {y.shape} {y.dtype}."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: x contains NaN or infinite values.")
    norms = np.linalg.norm(x, axis=1)
    if norms.size and norms.max() > 1.0 + 1e-6:
        raise ValueError(
            f"{name}: the certificate assumes ||x_i||_2 <= 1, but the largest norm is "
            f"{norms.max():.4g}; normalise the features (e.g. x / ||x||, as the paper does)."
        )
    if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]."
        )
    return x, y


def _dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _sum_grad(w, x, s, lam_n, b):
    """Gradient of the sum-form objective, per classifier: ``[d, K]``."""
    z = x @ w  # [n, K]
    return x.T @ (-s * jax.nn.sigmoid(-s * z)) + lam_n * w + b


def _sum_hessians(w, x, lam_n):
    """``[K, d, d]``: ``X^T diag(sigma(z) sigma(-z)) X + lam_n I`` per classifier."""
    z = x @ w
    d = jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)  # [n, K]
    h = jnp.einsum("nk,ni,nj->kij", d, x, x)
    return h + lam_n * jnp.eye(x.shape[1], dtype=x.dtype)[None]


def _objective(w, x, s, lam_n, b):
    """``[K]`` sum-form objectives."""
    z = x @ w
    return (
        jnp.sum(jax.nn.softplus(-s * z), axis=0)
        + 0.5 * lam_n * jnp.sum(w * w, axis=0)
        + jnp.sum(b * w, axis=0)
    )


@jax.jit
def _newton_fit(x, s, lam_n, b, w0, max_iter, tol):
    """Damped Newton (Armijo backtracking over 2^-k, k < 40) per classifier until ||grad|| <= tol."""
    steps = 0.5 ** jnp.arange(40, dtype=x.dtype)

    def cond(carry):
        w, k = carry
        g = _sum_grad(w, x, s, lam_n, b)
        return (k < max_iter) & (jnp.max(jnp.linalg.norm(g, axis=0)) > tol)

    def body(carry):
        w, k = carry
        g = _sum_grad(w, x, s, lam_n, b)
        h = _sum_hessians(w, x, lam_n)
        direction = -jnp.linalg.solve(h, g.T[:, :, None])[:, :, 0].T  # [d, K]
        f0 = _objective(w, x, s, lam_n, b)
        slope = jnp.sum(g * direction, axis=0)
        trial = jax.vmap(lambda t: _objective(w + t * direction, x, s, lam_n, b))(steps)  # [40, K]
        # Near the optimum the decrease is below the rounding of f: allow for it, or Armijo would
        # reject the (excellent) full Newton step and the iteration would stall.
        slack = 16 * jnp.finfo(x.dtype).eps * jnp.abs(f0)
        ok = trial <= f0[None] + 1e-4 * steps[:, None] * slope[None] + slack[None]
        first = jnp.argmax(ok, axis=0)
        t = jnp.where(jnp.any(ok, axis=0), steps[first], 0.0)
        return w + t[None] * direction, k + 1

    w, _ = jax.lax.while_loop(cond, body, (w0, jnp.asarray(0)))
    return w, jnp.sum(jnp.linalg.norm(_sum_grad(w, x, s, lam_n, b), axis=0))


def certified_fit(
    x: Any,
    y: Any,
    *,
    lam: float,
    epsilon: float,
    delta: float,
    key: jax.Array,
    sigma: float | None = None,
    budget: float | None = None,
    num_classes: int | None = None,
    gamma: float = LOGISTIC_GAMMA,
    max_iter: int = 100,
    tol: float | None = None,
) -> CertifiedLinearModel:
    r"""Trains the objective-perturbed L2 logistic regression (one-vs-rest for ``K > 2`` classes).

    Minimises :math:`L_b(w; D)` (module docstring) by damped Newton's method, with
    :math:`b \sim \mathcal N(0, \sigma^2 I)` drawn from ``key`` independently for each classifier.
    Give exactly one of ``sigma`` (the budget follows: :math:`\epsilon' = \sigma\epsilon/c`) and
    ``budget`` (:math:`\sigma = c\,\epsilon'/\epsilon`). The authors' code uses ``lam=1e-4`` ...
    ``1e-6`` and ``sigma=10``.

    Guarantees:
      With the removals of :func:`certified_remove` and while ``model.certified`` holds,
      :math:`(\epsilon, \delta)`-certified removal (Guo et al., Theorem 3) for the released weights.

    Args:
      x: ``[n, d]`` features with ``||x_i||_2 <= 1``.
      y: ``[n]`` integer labels in ``[0, K)``.
      lam: :math:`\lambda > 0`.
      epsilon, delta: the target guarantee (``epsilon > 0``, ``0 < delta < 1``).
      key: PRNG key for :math:`b`.
      sigma, budget: exactly one of them.
      num_classes: ``K`` (default ``max(y) + 1``); 2 gives a single binary classifier.
      gamma: Lipschitz constant of :math:`\ell''` used in the bounds.
      max_iter: Newton iterations at most.
      tol: stop when every classifier's sum-form gradient norm is at most this (default
        ``1e-12 * n`` in float64, ``1e-4 * n`` in float32).

    Returns:
      A :class:`CertifiedLinearModel` whose ``residual_bound`` starts at the achieved gradient norm.
    """
    _validate.positive(lam=lam, epsilon=epsilon, gamma=gamma)
    _validate.in_interval("delta", delta, 0.0, 1.0)
    _validate.positive_int(max_iter=max_iter)
    if (sigma is None) == (budget is None):
        raise ValueError("give exactly one of sigma= (noise std) and budget= (residual budget).")
    sigma = float(sigma) if sigma is not None else noise_scale(epsilon, delta, budget)
    _validate.positive(sigma=sigma)
    x, y = _check_data(x, y, num_classes, "certified_fit")
    k = int(num_classes if num_classes is not None else y.max() + 1)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got num_classes={k}.")
    dtype = _dtype()
    n, d = x.shape
    if tol is None:
        tol = (1e-12 if dtype == jnp.float64 else 1e-4) * n
    s = jnp.asarray(_signs(y, k), dtype)
    cols = s.shape[1]
    b = sigma * jax.random.normal(key, (d, cols), dtype)
    # Zero rows (see _pad_rows) add a constant to the objective and nothing to its derivatives.
    w, grad_norm = _newton_fit(
        jnp.asarray(_pad_rows(x), dtype),
        jnp.asarray(_pad_rows(np.asarray(s)), dtype),
        jnp.asarray(lam * n, dtype),
        b,
        jnp.zeros((d, cols), dtype),
        max_iter,
        jnp.asarray(tol, dtype),
    )
    return CertifiedLinearModel(
        weights=w,
        noise=b,
        lam=float(lam),
        sigma=sigma,
        epsilon=float(epsilon),
        delta=float(delta),
        gamma=float(gamma),
        num_train=n,
        residual_bound=float(grad_norm),
        num_classes=k,
    )


def _pad_rows(a: np.ndarray) -> np.ndarray:
    """Zero rows up to a power of two (>= 64): a zero feature row adds nothing to any sum below, and
    successive removals then share one compiled program."""
    rows = max(64, 1 << (a.shape[0] - 1).bit_length())
    return np.pad(a, ((0, rows - a.shape[0]), (0, 0)))


@jax.jit
def _newton_removal(w, x_rem, s_rem, x_out, s_out, lam, n_rem, m):
    # Delta = lam m w + sum_removed grad l  (sum form; the noise term cancels).
    z_out = x_out @ w
    delta = lam * m * w + x_out.T @ (-s_out * jax.nn.sigmoid(-s_out * z_out))
    h = _sum_hessians(w, x_rem, lam * n_rem)
    step = jnp.linalg.solve(h, delta.T[:, :, None])[:, :, 0].T
    return w + step, step


def certified_remove(
    model: CertifiedLinearModel,
    x_remaining: Any,
    y_remaining: Any,
    x_removed: Any,
    y_removed: Any,
    *,
    retrain_key: jax.Array | None = None,
) -> tuple[CertifiedLinearModel, RemovalReport]:
    r"""Removes ``m`` points by one Newton step and updates the certificate (module docstring).

    Args:
      model: the current model (from :func:`certified_fit` or a previous removal).
      x_remaining, y_remaining: ``[n - m, d]``, ``[n - m]``: the data that stays (the Newton step
        needs its Hessian).
      x_removed, y_removed: ``[m, d]``, ``[m]``: the points to remove.
      retrain_key: if given and the accumulated bound would exceed the budget, the model is
        retrained from scratch on the remaining data with fresh noise from this key (so the
        returned model is certified); if ``None``, the uncertified model is returned with
        ``report.certified = False`` and it is the caller's duty to retrain.

    Returns:
      ``(model, report)``.

    Raises:
      ValueError: sizes that do not add up to ``model.num_train``, bad features or labels.
    """
    if not isinstance(model, CertifiedLinearModel):
        raise TypeError(f"model must be a CertifiedLinearModel, got {type(model).__name__}.")
    x_rem, y_rem = _check_data(x_remaining, y_remaining, model.num_classes, "x_remaining")
    x_out, y_out = _check_data(x_removed, y_removed, model.num_classes, "x_removed")
    m, n_rem = x_out.shape[0], x_rem.shape[0]
    if m == 0:
        raise ValueError("x_removed is empty; there is nothing to remove.")
    if m + n_rem != model.num_train:
        raise ValueError(
            f"the model was trained on {model.num_train} points but {n_rem} remaining + {m} removed "
            f"= {n_rem + m}; pass exactly the remaining data of this model."
        )
    if x_rem.shape[1] != model.weights.shape[0] or x_out.shape[1] != model.weights.shape[0]:
        raise ValueError(f"features must have d={model.weights.shape[0]} columns.")
    dtype = model.weights.dtype
    xr, xo = jnp.asarray(_pad_rows(x_rem), dtype), jnp.asarray(_pad_rows(x_out), dtype)
    sr = jnp.asarray(_pad_rows(_signs(y_rem, model.num_classes)), dtype)
    so = jnp.asarray(_pad_rows(_signs(y_out, model.num_classes)), dtype)
    w_new, step = _newton_removal(
        model.weights, xr, sr, xo, so, jnp.asarray(model.lam, dtype), n_rem, m
    )
    step_bound = float(data_dependent_residual_bound(xr, step, gamma=model.gamma))
    actual = float(
        jnp.sum(
            jnp.linalg.norm(
                _sum_grad(w_new, xr, sr, jnp.asarray(model.lam * n_rem, dtype), model.noise), axis=0
            )
        )
    )
    accumulated = model.residual_bound + step_bound
    updated = model._replace(weights=w_new, num_train=n_rem, residual_bound=accumulated)
    budget = model.budget
    if accumulated <= budget or retrain_key is None:
        report = RemovalReport(
            step_bound, accumulated, budget, accumulated <= budget, False, actual
        )
        return updated, report
    retrained = certified_fit(
        x_rem,
        y_rem,
        lam=model.lam,
        epsilon=model.epsilon,
        delta=model.delta,
        key=retrain_key,
        sigma=model.sigma,
        num_classes=model.num_classes,
        gamma=model.gamma,
    )
    report = RemovalReport(
        step_bound, retrained.residual_bound, budget, retrained.certified, True, actual
    )
    return retrained, report
