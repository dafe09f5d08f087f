"""Datasets whose examples carry stable ids (in memory or streamed), forget-set selection, batching.

Examples:
  >>> from unlearn_jax import data
  >>> splits = data.load("digits")
  >>> split = data.class_forget(splits.train, 3)
  >>> split.spec, len(split.forget) + len(split.retain) == len(splits.train)
  ('class:3', True)
"""

from unlearn_jax.data.batching import (
    batch_stream,
    batches,
    map_batches,
    num_batches,
    padded_batches,
)
from unlearn_jax.data.dataset import Dataset, Splits, by_class, concat
from unlearn_jax.data.facts import FactsData, FactsSplit, QASet, generate_facts
from unlearn_jax.data.forget import (
    ForgetSplit,
    class_forget,
    forget_ids_hash,
    ids_forget,
    predicate_forget,
    random_forget,
    read_ids_file,
    select_forget,
)
from unlearn_jax.data.loaders import load
from unlearn_jax.data.multihost import global_batches, make_global, process_batches, process_rows
from unlearn_jax.data.stream import StreamedColumn, StreamedDataset
from unlearn_jax.data.tokenizer import Tokenizer

__all__ = [
    "Dataset",
    "FactsData",
    "FactsSplit",
    "ForgetSplit",
    "QASet",
    "Splits",
    "StreamedColumn",
    "StreamedDataset",
    "Tokenizer",
    "batch_stream",
    "batches",
    "by_class",
    "class_forget",
    "concat",
    "forget_ids_hash",
    "generate_facts",
    "global_batches",
    "ids_forget",
    "load",
    "make_global",
    "map_batches",
    "num_batches",
    "padded_batches",
    "predicate_forget",
    "process_batches",
    "process_rows",
    "random_forget",
    "read_ids_file",
    "select_forget",
]
