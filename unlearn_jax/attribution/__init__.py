"""Data attribution: projected per-example gradients, TRAK scores, the linear datamodeling score.

* :mod:`~.outputs`: the model output functions attributed (the margin of a classifier, the
  log-likelihood of a sequence, a regressor's prediction) and TRAK's out-to-loss weights;
* :mod:`~.features`: their per-example gradients projected per layer (Kronecker) or densely (a
  random matrix regenerated from a key), or not at all (identity);
* :mod:`~.trak`: TRAK over many checkpoints, cached on disk, scores written and read in blocks;
* :mod:`~.lds`: the linear datamodeling score.

Per-class scores of the training set feed datamodel matching
(:func:`unlearn_jax.methods.matching.dmm`; :class:`~.matching.MatchingContext` builds OM and DMM from
a benchmark's populations)::

    trak = TRAK(task, originals.params, splits.train, TRAKSpec(), cache_dir=..., stacked=True)
    beta = trak.scores(splits.train, per_class=True)          # [n, n, K], once per model
    method = dmm((beta.query_ids, beta.sum_rows(forget.ids)), forget_ids=forget.ids)
"""

from unlearn_jax.attribution.features import (
    FeatureSpec,
    Featurized,
    class_features,
    dense,
    example_features,
    feature_dim,
    featurize,
    identity,
    kronecker,
)
from unlearn_jax.attribution.lds import (
    LDSResult,
    average_ranks,
    linear_datamodeling_score,
    spearman,
    subset_masks,
)
from unlearn_jax.attribution.matching import MatchingContext, mean_logits
from unlearn_jax.attribution.outputs import (
    LOG_LIKELIHOOD,
    LOGIT,
    MARGIN,
    PREDICTION,
    OutputFunction,
    default_output,
    margins,
)
from unlearn_jax.attribution.trak import TRAK, ScoreStore, TRAKSpec

__all__ = [
    "LOGIT",
    "LOG_LIKELIHOOD",
    "MARGIN",
    "PREDICTION",
    "TRAK",
    "FeatureSpec",
    "Featurized",
    "LDSResult",
    "MatchingContext",
    "OutputFunction",
    "ScoreStore",
    "TRAKSpec",
    "average_ranks",
    "class_features",
    "default_output",
    "dense",
    "example_features",
    "feature_dim",
    "featurize",
    "identity",
    "kronecker",
    "linear_datamodeling_score",
    "margins",
    "mean_logits",
    "spearman",
    "subset_masks",
]
