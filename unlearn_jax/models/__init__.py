"""Flax linen models that come with their task: linear, MLP, CNN, ResNet (GroupNorm), MLP regressor,
and a decoder-only transformer language model (:mod:`unlearn_jax.models.transformer`).

Every model

* takes a batch of inputs with a leading batch axis and shapes it itself (the dense models flatten,
  the convolutional ones accept ``[B, H, W]`` or ``[B, H, W, C]``);
* has only the ``"params"`` variable collection (no BatchNorm; see :mod:`unlearn_jax.models.resnet`),
  so it is an ordinary function of one example and ``vmap`` gives true per-example quantities;
* exposes ``features(x) -> [B, D]``, its penultimate representation, and names its last layer
  ``"head"`` (a Dense with ``kernel [D, K]``, ``bias [K]``), so ``outputs = features @ kernel + bias``.

The language models (``"transformer"``, ``"lm-tiny"``, ``"lm-100m"``, ``"lm-1b"``; ``num_outputs``
is the vocabulary size) map tokens ``[B, T]`` to logits ``[B, T, V]``, have the ``"sequence"`` task
kind, ``features(x) -> [B, T, D]`` and tied input/output embeddings instead of a ``"head"``, and
annotate their parameters with logical axis names (``model.init`` returns boxes; ``nn.unbox`` them).

Use :func:`get_model` to build one by name, :func:`model_task` for its :class:`~unlearn_jax.Task`,
:func:`feature_extractor` for a frozen backbone, and :func:`model_config` to record how it was built.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from unlearn_jax import _validate
from unlearn_jax.core.task import CLASSIFICATION, Task, flax_task
from unlearn_jax.models.cnn import CNN
from unlearn_jax.models.linear import Linear
from unlearn_jax.models.mlp import MLP, MLPRegressor
from unlearn_jax.models.resnet import ResNet
from unlearn_jax.models.transformer import CONFIGS as _LM_CONFIGS
from unlearn_jax.models.transformer import LM1B, LM100M, LMTiny, TransformerLM

MODELS: dict[str, type[nn.Module]] = {
    "linear": Linear,
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
    "mlp_regressor": MLPRegressor,
}
# Kept apart from MODELS (models of images and feature vectors, K outputs): token inputs [B, T],
# logits [B, T, V], no "head".
LANGUAGE_MODELS: dict[str, type[nn.Module]] = dict(_LM_CONFIGS)
_REGISTRY = {**MODELS, **LANGUAGE_MODELS}

HEAD = "head"


def get_model(name: str, *, num_outputs: int, **kwargs: Any) -> nn.Module:
    """Builds a registered model by name.

    Args:
      name: one of ``"linear"``, ``"mlp"``, ``"cnn"``, ``"resnet"``, ``"mlp_regressor"``, or a
        language model: ``"transformer"`` (every size set by keywords), ``"lm-tiny"`` (D 128, 2
        layers), ``"lm-100m"`` (>= 100M parameters for V >= 20k), ``"lm-1b"`` (0.97B at V 32000).
      num_outputs: ``K``, the number of classes or regression targets; the vocabulary size ``V``
        of a language model.
      **kwargs: the model's other hyper-parameters (e.g. ``hidden_sizes=(256,)`` for the MLP).

    Returns:
      The (unbound) Flax module.

    Raises:
      ValueError: for an unknown name (listing the valid ones), a bad ``num_outputs``, or a keyword
        the model does not have (listing the ones it has).

    Examples:
      >>> get_model("mlp", num_outputs=10, hidden_sizes=(32,))
      MLP(
          # attributes
          num_outputs = 10
          hidden_sizes = (32,)
          activation = 'relu'
      )
    """
    _validate.one_of("model name", name, _REGISTRY)
    _validate.positive_int(num_outputs=num_outputs)
    cls = _REGISTRY[name]
    fields = _config_fields(cls)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(
            f"model {name!r} has no hyper-parameter(s) {unknown}; it accepts: {sorted(fields)}."
        )
    # Tuples, not lists: module attributes must be hashable for jit's static arguments.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(num_outputs=num_outputs, **kwargs)


def model_config(module: nn.Module) -> dict[str, Any]:
    """The JSON-serialisable recipe of a registered model: ``get_model(**model_config(m)) == m``.

    Returns:
      ``{"name": <registry name>, "num_outputs": K, <hyper-parameter>: value, ...}`` with tuples
      turned into lists.

    Raises:
      ValueError: if ``module`` is not an instance of a registered model class.
    """
    names = {cls: name for name, cls in _REGISTRY.items()}
    if type(module) not in names:
        raise ValueError(
            f"model_config knows only the registered models {sorted(_REGISTRY)}; got a "
            f"{type(module).__name__}. Record a custom model's configuration yourself."
        )
    config: dict[str, Any] = {"name": names[type(module)]}
    for field in _config_fields(type(module)):
        value = getattr(module, field)
        config[field] = list(value) if isinstance(value, tuple) else value
    return config


def model_task(module: nn.Module, kind: str | None = None) -> Task:
    """The :class:`~unlearn_jax.Task` of a Flax module whose parameters are the ``"params"`` collection.

    Args:
      module: a Flax linen module mapping ``x [B, ...]`` to outputs ``[B, K]``.
      kind: ``"classification"``, ``"regression"`` or ``"sequence"``; defaults to the model's own
        ``kind`` (``"regression"`` for :class:`MLPRegressor`, ``"sequence"`` for the language
        models, ``"classification"`` otherwise, and for modules that do not declare one).

    Returns the same :class:`~unlearn_jax.Task` object for equal modules and kinds, so that
    training and evaluation steps compiled for one call are reused by the next.
    """
    if kind is None:
        kind = getattr(module, "kind", CLASSIFICATION)
    try:
        return _cached_task(module, kind)
    except TypeError:  # unhashable module attributes: no caching
        return flax_task(module, kind)


@functools.lru_cache(maxsize=256)
def _cached_task(module: nn.Module, kind: str) -> Task:
    # Equal modules get the same Task object, so jitted steps keyed on the task (static argument)
    # are compiled once per model configuration rather than once per call.
    return flax_task(module, kind)


def feature_extractor(module: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """``features(params, x) -> [B, D]``: the penultimate representation of a model.

    ``params`` is the full parameter tree of ``module`` (the head is present but unused), so a
    trained model's parameters serve directly as a frozen backbone. For every model of this package

    .. math:: f(x) = \\phi(x) W_{\\text{head}} + b_{\\text{head}}, \\qquad
              \\phi = \\texttt{features(params, x)}, \\; W_{\\text{head}} = \\texttt{params["head"]["kernel"]}.

    Raises:
      TypeError: if ``module`` has no ``features`` method.
    """
    method = getattr(type(module), "features", None)
    if method is None:
        raise TypeError(
            f"{type(module).__name__} has no `features` method; every model of unlearn_jax.models "
            "has one. For a custom model, define `features(self, x) -> [B, D]` or use "
            "`capture_intermediates` of `Module.apply`."
        )
    return lambda params, x: module.apply({"params": params}, x, method=method)


def _config_fields(cls: type[nn.Module]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


__all__ = [
    "CNN",
    "HEAD",
    "LANGUAGE_MODELS",
    "LM1B",
    "LM100M",
    "MLP",
    "MODELS",
    "LMTiny",
    "Linear",
    "MLPRegressor",
    "ResNet",
    "TransformerLM",
    "feature_extractor",
    "get_model",
    "model_config",
    "model_task",
]
