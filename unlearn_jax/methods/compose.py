"""Composition of whole methods: run one method, then another on its result.

Gradient transforms compose with :func:`~unlearn_jax.methods.transforms.chain` (inside one method).
Whole methods compose with :func:`sequence`: ``sequence(ssd(...), finetune(steps=20))`` dampens with
SSD, then fine-tunes the dampened model, a common recipe. Each stage is a complete run: its
statistics are computed on the previous stage's result (SalUn's saliency after SSD is the saliency
of the dampened model), then its ``init`` and ``update`` run as in
:func:`~unlearn_jax.methods.unlearn`, so a sequence equals running its stages one after the other
(with keys ``fold_in(key, stage)``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from unlearn_jax.methods.protocol import GUARANTEES, Unlearner, check_unlearner


class Sequence(NamedTuple):
    """Methods run one after the other (build with :func:`sequence`).

    Attributes:
      stages: the :class:`~unlearn_jax.methods.protocol.Unlearner`\\ s, each with its own run
        length (one-shot methods fix theirs; others through ``steps=``/``epochs=`` of their recipe or
        :func:`~unlearn_jax.methods.protocol.with_run`).
      name: ``"a>b>..."``.
    """

    stages: tuple[Unlearner, ...]
    name: str

    @property
    def guarantee(self) -> str:
        """The weakest of the stages' guarantees (a sequence is only as exact as its least exact
        stage)."""
        return max((s.guarantee for s in self.stages), key=GUARANTEES.index)

    def run(self, driver, state, task, forget, retain, *, key, steps, epochs, stats, **kwargs):
        """Runs the stages with ``driver`` (:func:`unlearn` or :func:`unlearn_many`)."""
        if steps is not None or epochs is not None:
            raise ValueError(
                f"{self.name}: a sequence takes its stages' own run lengths; pass steps/epochs to "
                "each stage (e.g. finetune(steps=20)), not to unlearn()."
            )
        if stats:
            raise ValueError(
                f"{self.name}: statistics are computed per stage, on the previous stage's result; "
                "pass cached statistics to the stage that uses them instead."
            )
        results = []
        for i, stage in enumerate(self.stages):
            result = driver(
                stage, state, task, forget, retain, key=jax.random.fold_in(key, i), **kwargs
            )
            state = result.states if hasattr(result, "states") else result.state
            results.append(result)
        metrics = {f"stage{i}/{k}": v for i, r in enumerate(results) for k, v in r.metrics.items()}
        hparams = {"stages": [{"method": r.method, **r.hparams} for r in results]}
        last = results[-1]
        common = dict(
            metrics=metrics,
            wall_time=sum(r.wall_time for r in results),
            steps=sum(r.steps for r in results),
            method=self.name,
            hparams=hparams,
            guarantee=self.guarantee,
        )
        if hasattr(last, "method_states"):  # unlearn_many
            return last._replace(method_states=tuple(r.method_states for r in results), **common)
        return last._replace(method_state=tuple(r.method_state for r in results), **common)


def sequence(*methods: Any) -> Sequence:
    """Runs ``methods`` one after the other on the same request (module docstring).

    Args:
      *methods: two or more :class:`~unlearn_jax.methods.protocol.Unlearner`\\ s (or sequences,
        which are flattened), each with its own run length.

    Returns:
      A :class:`Sequence`, accepted wherever a method is (:func:`~unlearn_jax.methods.unlearn`,
      :func:`~unlearn_jax.methods.unlearn_many`). Its metrics are the stages' prefixed
      ``stage<i>/``; its method state the tuple of the stages' final states.

    Raises:
      ValueError: fewer than two methods, or a stage whose run length is the caller's.
    """
    stages: list[Unlearner] = []
    for m in methods:
        stages.extend(m.stages if isinstance(m, Sequence) else [check_unlearner(m)])
    if len(stages) < 2:
        raise ValueError(f"sequence() needs at least two methods, got {len(stages)}.")
    for s in stages:
        if s.feeds.run is None:
            raise ValueError(
                f"{s.name} in a sequence needs its own run length: build it with steps= or epochs= "
                "(e.g. finetune(steps=20)) or wrap it with with_run(method, steps=...)."
            )
    return Sequence(tuple(stages), ">".join(s.name for s in stages))


__all__ = ["Sequence", "sequence"]
