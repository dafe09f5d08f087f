r"""Language-model unlearning recipes: gradient ascent, GradDiff, NPO, SimNPO, IdK, IdkDPO, RMU, SAM.

Every recipe is a :func:`~unlearn_jax.methods.gradient.gradient_method` over the objective terms of
:mod:`~unlearn_jax.methods.objectives`, on a sequence :class:`~unlearn_jax.Task` (``model_task`` of
a :class:`~unlearn_jax.models.transformer.TransformerLM`) and question-answer batches whose token
``weights`` mark the answer. Likelihoods are sequence log-likelihoods of the answer tokens,

.. math:: \log\pi_\theta(a|q) = \sum_t w_t \log p_\theta(y_t \mid x_{\le t}), \qquad
          |a| = \sum_t w_t,

never raw logits (:func:`~unlearn_jax.methods.objectives.example_log_likelihood`); the task loss of a
sequence is :math:`-\log\pi_\theta(a|q)`. The retain regulariser is either that loss on the retain
batch (``retain="nll"``, GradDiff-style) or the KL divergence to the model before unlearning on the
retain answers' next-token distributions (``retain="kl"``,
:func:`~unlearn_jax.methods.objectives.retain_sequence_kl`).

Defaults are the papers' settings for 7B-parameter models (AdamW, learning rate 1e-5, weight decay
0.01, TOFU's; RMU's WMDP settings); a small model needs its own learning rates and run lengths,
which is what :mod:`unlearn_jax.apps.lm_registry` holds for ``lm-tiny`` on the fictitious facts.

Examples:
  >>> method = npo(beta=0.1, retain="kl", learning_rate=1e-4)
  >>> method.name, [t["term"] for t in method.hparams["phases"][0]["terms"]]
  ('npo', ['forget/npo', 'retain/sequence_kl'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate
from unlearn_jax.methods import gradient as G
from unlearn_jax.methods import objectives as O
from unlearn_jax.methods.gradient import gradient_method
from unlearn_jax.methods.protocol import Checks, Unlearner
from unlearn_jax.methods.transforms import GradientTransform

RETAIN_TERMS = ("nll", "kl")
ADAMW_WEIGHT_DECAY = 0.01


# ---- parts --------------------------------------------------------------------------------------
def _optimizer(optimizer, learning_rate: float, record: dict) -> optax.GradientTransformation:
    if optimizer is not None:
        record["optimizer"] = "custom"
        record.pop("learning_rate", None)
        return optimizer
    _validate.positive(learning_rate=learning_rate)
    record["optimizer"] = f"adamw(weight_decay={ADAMW_WEIGHT_DECAY})"
    return optax.adamw(learning_rate, weight_decay=ADAMW_WEIGHT_DECAY)


def retain_term(retain: str) -> O.Term:
    r"""The retain regulariser by name: ``"nll"`` (:math:`-\log\pi_\theta(a|q)` on the retain batch,
    :func:`~unlearn_jax.methods.objectives.retain_loss`) or ``"kl"`` (the KL divergence to the model
    before unlearning, :func:`~unlearn_jax.methods.objectives.retain_sequence_kl`).

    Raises:
      ValueError: another name.
    """
    _validate.one_of("retain", retain, RETAIN_TERMS)
    return O.retain_loss() if retain == "nll" else O.retain_sequence_kl()


def _with_retain(objective, retain: str, weight: float, record: dict):
    _validate.non_negative(retain_weight=weight)
    _validate.one_of("retain", retain, RETAIN_TERMS)
    record.update(retain=retain, retain_weight=weight)
    return objective + weight * retain_term(retain) if weight > 0 else objective


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def trainable(prefixes: Sequence[str]) -> GradientTransform:
    r"""Only the parameters whose path starts with one of ``prefixes`` may move.

    The path of a leaf is its keys joined by ``/`` (``"layers_1/mlp/wo/kernel"``). The gradient of
    every other leaf is zeroed and its value kept bit for bit (:math:`\theta' = \text{where}(m,
    \theta + u, \theta)`, so weight decay cannot move it either): RMU trains a few blocks only.

    Args:
      prefixes: path prefixes, e.g. ``("layers_0", "layers_1/mlp")``.

    Raises:
      ValueError: no prefix, or (at ``init``) no parameter matches any prefix.
    """
    prefixes = tuple(prefixes)
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"prefixes must be non-empty strings, got {prefixes!r}.")

    def selected(path) -> bool:
        name = _path_name(path)
        return any(name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes)

    def init(params, key, stats):
        del key, stats
        flags = jax.tree_util.tree_map_with_path(lambda path, _: selected(path), params)
        if not any(jax.tree_util.tree_leaves(flags)):
            names = sorted({_path_name(p).split("/")[0] for p, _ in _leaves_with_path(params)})
            raise ValueError(
                f"no parameter path starts with {list(prefixes)}; the top-level names are "
                f"{names} (a scanned transformer stacks its blocks under 'layers': build it with "
                "scan_layers=False to train single blocks)."
            )
        return jax.tree_util.tree_map(lambda f: jnp.asarray(f), flags)

    def update(grads, state, params):
        del params
        return jax.tree_util.tree_map(lambda m, g: jnp.where(m, g, 0), state, grads), state

    return GradientTransform(
        "trainable",
        init,
        update=update,
        update_mask=lambda state: state,
        hparams={"trainable": list(prefixes)},
    )


def _leaves_with_path(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _answers_check(answers: Any, name: str) -> Checks:
    """A host-side check that every forget id has an alternate answer."""
    known = np.sort(np.asarray(answers.ids, np.int64))

    def request(task, params, forget, retain):
        del task, params, retain
        missing = np.setdiff1d(np.asarray(forget.ids, np.int64), known)
        if missing.size:
            raise ValueError(
                f"{name}: {missing.size} forget ids have no alternate answer (e.g. "
                f"{missing[:5].tolist()}); build the answers for every forget id, e.g. "
                "FactsData.with_answers(forget.ids, refusals)."
            )

    return Checks(request=request)


def _run(steps, epochs) -> dict:
    return {"steps": steps, "epochs": epochs}


# ---- recipes ------------------------------------------------------------------------------------
def gradient_ascent(
    *,
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""Gradient ascent on the forget answers: :math:`\min_\theta \frac1B\sum_{i\in D_f}
    \log\pi_\theta(a_i|q_i)` (the negated sequence loss, answer tokens only).

    Defaults: AdamW, learning rate 1e-5, weight decay 0.01 (TOFU's). Unbounded below: run it for
    a few epochs only.

    Guarantees:
      Approximate; collapses the model first among these methods (NPO's motivation).

    References:
      Jang et al. Knowledge Unlearning for Mitigating Privacy Risks in Language Models. ACL 2023;
      Maini et al. TOFU. 2024 (arXiv:2401.06121).
    """
    record = {"learning_rate": learning_rate}
    opt = _optimizer(optimizer, learning_rate, record)
    return gradient_method(-O.forget_loss(), opt, name="ga", hparams=record, **_run(steps, epochs))


def grad_diff(
    *,
    gamma: float = 1.0,
    retain: str = "nll",
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""GradDiff: :math:`\min_\theta \frac1B\sum_{i\in D_f}\log\pi_\theta(a_i|q_i) + \gamma\,
    R(\theta; D_r)` with :math:`R` the retain NLL (``retain="nll"``) or the KL to the model before
    unlearning (``"kl"``, TOFU's "KL" method).

    Defaults: ``gamma = 1``, AdamW learning rate 1e-5 (TOFU's).

    Guarantees:
      Approximate.

    References:
      Liu, Liu, Stone. Continual Learning and Private Unlearning. CoLLAs 2022; Maini et al. TOFU.
    """
    record = {"gamma": gamma, "learning_rate": learning_rate}
    objective = _with_retain(-O.forget_loss(), retain, gamma, record)
    record["gamma"] = record.pop("retain_weight")
    opt = _optimizer(optimizer, learning_rate, record)
    return gradient_method(objective, opt, name="grad_diff", hparams=record, **_run(steps, epochs))


def npo(
    beta: float = 0.1,
    *,
    retain_weight: float = 1.0,
    retain: str = "nll",
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""NPO on the forget answers plus a retain term:

    .. math::
        \min_\theta -\frac{2}{\beta}\,\frac1B\sum_{i\in D_f}\log\sigma\Bigl(-\beta\log
        \frac{\pi_\theta(a_i|q_i)}{\pi_{\text{ref}}(a_i|q_i)}\Bigr) + w\,R(\theta; D_r)

    (:func:`~unlearn_jax.methods.objectives.npo_loss`; :math:`\pi_{\text{ref}}` the model before
    unlearning; :math:`R` the retain NLL, "NPO+RT", or the KL, "NPO+KL").

    Defaults: ``beta = 0.1``, retain weight 1, AdamW learning rate 1e-5 (the paper's TOFU setting).

    Guarantees:
      Approximate; drifts towards collapse exponentially slower than gradient ascent.

    References:
      Zhang, Lin, Bai, Mei. Negative Preference Optimization: From Catastrophic Collapse to Effective
      Unlearning. COLM 2024 (arXiv:2404.05868).
    """
    record = {"beta": beta, "learning_rate": learning_rate}
    objective = _with_retain(O.npo(beta=beta), retain, retain_weight, record)
    opt = _optimizer(optimizer, learning_rate, record)
    return gradient_method(objective, opt, name="npo", hparams=record, **_run(steps, epochs))


def simnpo(
    beta: float = 2.5,
    gamma: float = 0.0,
    *,
    retain_weight: float = 0.125,
    retain: str = "nll",
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""SimNPO, reference-free and length-normalised, plus a retain term:

    .. math::
        \min_\theta -\frac{2}{\beta}\,\frac1B\sum_{i\in D_f}\log\sigma\Bigl(-\frac{\beta}{|a_i|}
        \log\pi_\theta(a_i|q_i) - \gamma\Bigr) + w\,R(\theta; D_r)

    (:func:`~unlearn_jax.methods.objectives.simnpo_loss`, :math:`|a_i|` the number of answer tokens).

    Defaults: ``beta = 2.5``, ``gamma = 0``, retain weight 0.125, AdamW learning rate 1e-5.

    Guarantees:
      Approximate.

    References:
      Fan, Liu, Lin, Jia, Zhang, Mei, Liu. Simplicity Prevails: Rethinking Negative Preference
      Optimization for LLM Unlearning. 2024 (arXiv:2410.07163).
    """
    record = {"beta": beta, "gamma": gamma, "learning_rate": learning_rate}
    objective = _with_retain(O.simnpo(beta=beta, gamma=gamma), retain, retain_weight, record)
    opt = _optimizer(optimizer, learning_rate, record)
    return gradient_method(objective, opt, name="simnpo", hparams=record, **_run(steps, epochs))


def idk_nll(
    answers: Any,
    *,
    retain_weight: float = 1.0,
    retain: str = "nll",
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""IdK fine-tuning: learn to answer the forget questions with a refusal,

    .. math:: \min_\theta \frac1B\sum_{i\in D_f} -\log\pi_\theta(\tilde a_i|q_i) + w\,R(\theta; D_r),

    :math:`\tilde a_i` the alternate answer of forget example :math:`i` ("I don't know.", ...;
    :func:`~unlearn_jax.methods.objectives.idk_nll`). TOFU's IdK trains on the refusal and retain
    batches with one cross-entropy (retain weight 1).

    Args:
      answers: a sequence dataset with one alternate answer per forget id (its ids), e.g.
        ``FactsData.with_answers(forget_ids, refusals)``.
      retain_weight, retain: the retain term.
      learning_rate, optimizer, steps, epochs: as for :func:`npo`.

    Guarantees:
      Approximate; hides the answers rather than removing them (refusals are learned on top).

    References:
      Maini et al. TOFU: A Task of Fictitious Unlearning for LLMs. 2024 (arXiv:2401.06121);
      open-unlearning's IdkNLL.
    """
    record = {"learning_rate": learning_rate}
    objective = _with_retain(O.idk_nll(answers), retain, retain_weight, record)
    opt = _optimizer(optimizer, learning_rate, record)
    method = gradient_method(objective, opt, name="idk_nll", hparams=record, **_run(steps, epochs))
    return method._replace(checks=_answers_check(answers, "idk_nll"))


def idk_dpo(
    answers: Any,
    beta: float = 0.1,
    *,
    retain_weight: float = 1.0,
    retain: str = "nll",
    learning_rate: float = 1e-5,
    optimizer=None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""IdkDPO (IdkPO): prefer a refusal :math:`\tilde a_i` over the forget answer :math:`a_i`,

    .. math::
        \min_\theta -\frac{2}{\beta}\,\frac1B\sum_{i\in D_f}\log\sigma\Bigl(\beta\Bigl[
        \log\frac{\pi_\theta(\tilde a_i|q_i)}{\pi_{\text{ref}}(\tilde a_i|q_i)}
        - \log\frac{\pi_\theta(a_i|q_i)}{\pi_{\text{ref}}(a_i|q_i)}\Bigr]\Bigr) + w\,R(\theta; D_r)

    (:func:`~unlearn_jax.methods.objectives.dpo_loss`; :math:`\pi_{\text{ref}}` the model before
    unlearning).

    Args:
      answers: the refusals, one per forget id (as for :func:`idk_nll`).
      beta: inverse temperature > 0 (0.1 in the NPO paper's TOFU runs).
      retain_weight, retain, learning_rate, optimizer, steps, epochs: as for :func:`npo`.

    Guarantees:
      Approximate.

    References:
      Rafailov et al. Direct Preference Optimization. NeurIPS 2023 (arXiv:2305.18290); Zhang, Lin,
      Bai, Mei. NPO. COLM 2024 (arXiv:2404.05868), the IdkDPO baseline; Maini et al. TOFU. 2024.
    """
    record = {"beta": beta, "learning_rate": learning_rate}
    objective = _with_retain(O.idk_dpo(answers, beta), retain, retain_weight, record)
    opt = _optimizer(optimizer, learning_rate, record)
    method = gradient_method(objective, opt, name="idk_dpo", hparams=record, **_run(steps, epochs))
    return method._replace(checks=_answers_check(answers, "idk_dpo"))


def rmu_blocks(layer: int) -> tuple[str, ...]:
    """The blocks RMU trains by default for activations after ``layer`` blocks: the block that
    produces them and the two before it (``layers_{max(0, layer-3)}`` .. ``layers_{layer-1}``), as
    the WMDP recipe trains layers k-2..k for activations at layer k.

    Raises:
      ValueError: ``layer < 1`` (the embedding's output has no block before it).
    """
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or layer < 1:
        raise ValueError(f"RMU's layer must be an integer >= 1 (blocks before it), got {layer=!r}.")
    return tuple(f"layers_{i}" for i in range(max(0, layer - 3), layer))


def rmu(
    layer: int,
    *,
    coefficient: float = 6.5,
    alpha: float = 1200.0,
    update: Sequence[str] | None = None,
    learning_rate: float = 5e-5,
    optimizer=None,
    hidden_states: O.HiddenStatesFn | None = None,
    steps: int | None = None,
    epochs: float | None = None,
) -> Unlearner:
    r"""RMU (representation misdirection): on the forget batch, push the activations after ``layer``
    blocks towards :math:`c\,u`, a scaled fixed random unit vector; on the retain batch, keep them
    equal to the frozen original's; train only a few blocks:

    .. math::
        \min_\theta \frac1B\sum_{i\in D_f} \frac1{|a_i|}\sum_{t} w_{it}
            \lVert h^\theta_{\ell}(x_i)_t - c\,u\rVert_2^2
        + \alpha\,\frac1B\sum_{j\in D_r}\frac1{|a_j|}\sum_t w_{jt}
            \lVert h^\theta_{\ell}(x_j)_t - h^{\text{frozen}}_{\ell}(x_j)_t\rVert_2^2,

    :math:`u = r / \lVert r\rVert`, :math:`r_k \sim \mathcal U[0, 1)` drawn from the method's key at
    ``init`` (:func:`~unlearn_jax.methods.objectives.rmu_direction`); tokens: the answer tokens
    (``weights``). The WMDP code's ``mse_loss`` also divides both terms by :math:`D` (a constant
    factor: the same minimiser, the same Adam trajectory up to its epsilon).

    Args:
      layer: :math:`\ell`, the number of blocks before the steered activations (1 .. L).
      coefficient: :math:`c > 0`; it must exceed the usual norm of those activations to act (for
        Zephyr-7B the paper uses 6.5).
      alpha: the retain weight :math:`\alpha \ge 0` (1200 in the WMDP recipe).
      update: parameter path prefixes that may move (default :func:`rmu_blocks`: the block that
        produces the activations and the two before it; the WMDP code moves only their MLP output
        projections, ``("layers_0/mlp/wo", ...)``).
      learning_rate: AdamW learning rate (5e-5 in the WMDP recipe).
      optimizer: an optax optimizer instead.
      hidden_states: ``(task, params, x) -> [B, T, D]`` (default: the transformer's
        ``hidden_states(x, layer)``).
      steps, epochs: optionally fix the run length.

    Guarantees:
      Approximate; the parameters outside ``update`` are unchanged bit for bit.

    References:
      Li et al. The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning. ICML 2024
      (arXiv:2403.03218), section 5.
    """
    _validate.non_negative(alpha=alpha)
    update = tuple(update) if update is not None else rmu_blocks(layer)
    record = {"layer": layer, "coefficient": coefficient, "alpha": alpha, "update": list(update),
              "learning_rate": learning_rate}  # fmt: skip
    forget = O.rmu_forget(layer, coefficient, hidden_states=hidden_states)
    objective = forget + alpha * O.rmu_retain(layer, hidden_states=hidden_states)
    opt = _optimizer(optimizer, learning_rate, record)
    return gradient_method(
        objective, opt, transform=trainable(update), name="rmu", hparams=record,
        **_run(steps, epochs),
    )  # fmt: skip


def sam(method: Unlearner, rho: float = 0.01) -> Unlearner:
    r"""The sharpness-aware version of an LM recipe (:func:`~unlearn_jax.methods.gradient.sam`): the
    forget terms' gradient at :math:`\theta + \rho\,g_f/\lVert g_f\rVert`, the retain terms' at
    :math:`\theta`; host-side checks of ``method`` (alternate answers for every forget id) kept.

    Args:
      method: a recipe of this module (or any gradient method).
      rho: perturbation radius >= 0 (0.01 on MUSE, 0.1 on WMDP in the paper).

    Guarantees:
      Approximate; aims at robustness to relearning attacks.

    References:
      Fan, Jia, Zhang, Ramakrishna, Hong, Liu. Towards LLM Unlearning Resilient to Relearning
      Attacks: A Sharpness-Aware Minimization Perspective and Beyond. ICML 2025 (arXiv:2502.05374).
    """
    return G.sam(method, rho=rho)._replace(checks=method.checks)


__all__ = [
    "RETAIN_TERMS",
    "grad_diff",
    "gradient_ascent",
    "idk_dpo",
    "idk_nll",
    "npo",
    "retain_term",
    "rmu",
    "rmu_blocks",
    "sam",
    "simnpo",
    "trainable",
]
