"""Choosing the forget set: which training examples a model must unlearn.

Every selector splits a training :class:`Dataset` into ``forget`` and ``retain`` (disjoint, together
the whole training set, each in training-set order) and returns a canonical ``spec`` string that
describes the choice for reports and checkpoint metadata:

==========================  ============================  ===================================
selector                    spec                          forget set
==========================  ============================  ===================================
``class_forget(t, 3)``      ``class:3``                   every example of class 3
``random_forget(t, 0.1)``   ``random:0.1@seed0``          ``round(0.1 * N)`` random examples
``ids_forget(t, ids)``      ``ids:<count>@<sha256[:12]>`` the examples with these ids
``predicate_forget(...)``   ``predicate:<name>``          where ``predicate(x, y, ids)`` holds
==========================  ============================  ===================================

:func:`select_forget` parses the command-line forms ``class:3``, ``random:0.1[@seed3]``,
``ids:1,2,3`` and ``ids:FILE``. Every selector refuses an empty forget set and a forget set that is
the whole training set (nothing would be left to retain).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from unlearn_jax import _validate
from unlearn_jax.data.dataset import Dataset, as_id_array, describe_values, repeated_values
from unlearn_jax.data.stream import StreamedDataset


class ForgetSplit(NamedTuple):
    """A training set split into the examples to forget and those to retain.

    Attributes:
      forget: the examples to unlearn, in training-set order.
      retain: all other training examples, in training-set order.
      spec: the canonical description of the choice, e.g. ``"class:3"`` or ``"random:0.1@seed0"``.
    """

    forget: Dataset
    retain: Dataset
    spec: str


def forget_ids_hash(ids: Any) -> str:
    """A stable fingerprint of a set of example ids, for checkpoint metadata.

    The SHA-256 hex digest of the sorted, de-duplicated ids written as little-endian int64, so it does
    not depend on the order of ``ids``, their integer dtype, the platform or the library version.

    Args:
      ids: ``[M]`` integer ids, or a :class:`Dataset` (its ids are used).

    Returns:
      64 lowercase hex characters.

    Examples:
      >>> forget_ids_hash([2, 0, 1]) == forget_ids_hash(np.array([0, 1, 2], np.int32))
      True
    """
    if isinstance(ids, Dataset | StreamedDataset):
        ids = ids.ids
    canonical = np.unique(as_id_array(ids)).astype("<i8")
    return hashlib.sha256(canonical.tobytes()).hexdigest()


def _check_train(train: Any) -> None:
    # A streamed dataset splits into views: its ids and labels are in memory, its records are not.
    if not isinstance(train, Dataset | StreamedDataset):
        raise TypeError(
            f"train must be an unlearn_jax.data.Dataset or StreamedDataset, got "
            f"{type(train).__name__}."
        )
    if len(train) < 2:
        raise ValueError(
            f"{train.name or 'train'} has {len(train)} examples; a forget/retain split needs >= 2."
        )


def _split(train: Dataset, forget_mask: np.ndarray, spec: str) -> ForgetSplit:
    n_forget = int(forget_mask.sum())
    label = train.name or "the training set"
    if n_forget == 0:
        raise ValueError(
            f"forget set {spec!r} is empty: it selects none of the {len(train)} "
            f"examples of {label}."
        )
    if n_forget == len(train):
        raise ValueError(
            f"forget set {spec!r} is all {len(train)} examples of {label}, so the retain set "
            "would be empty; choose a smaller forget set."
        )
    base = train.name or "train"
    return ForgetSplit(
        forget=dataclasses.replace(train.subset(forget_mask), name=f"{base}/forget"),
        retain=dataclasses.replace(train.subset(~forget_mask), name=f"{base}/retain"),
        spec=spec,
    )


def random_forget(train: Dataset, fraction: float, *, seed: int = 0) -> ForgetSplit:
    """Forgets a uniformly random subset of ``round(fraction * N)`` (at least 1) examples.

    The choice depends only on ``seed`` and the *set* of ids, not on the order of the rows, so
    ``random_forget(train.take(perm), f, seed=s)`` forgets the same ids as ``random_forget(train, f,
    seed=s)``.

    Args:
      train: the training set, ``N >= 2`` examples.
      fraction: the fraction to forget, in ``(0, 1)``.
      seed: an integer >= 0 for ``numpy.random.default_rng``.

    Returns:
      ``ForgetSplit`` with spec ``"random:<fraction>@seed<seed>"``.

    Raises:
      ValueError: if ``fraction`` is outside ``(0, 1)``, ``seed`` is not an integer >= 0, or the
        rounded count is all of ``train``.
    """
    _check_train(train)
    _validate.in_interval("fraction", fraction, 0.0, 1.0)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got seed={seed!r}.")
    n = len(train)
    count = max(1, math.floor(fraction * n + 0.5))
    spec = f"random:{float(fraction)!r}@seed{int(seed)}"
    by_id = np.argsort(train.ids, kind="stable")
    chosen = by_id[np.random.default_rng(int(seed)).permutation(n)[:count]]
    mask = np.zeros(n, bool)
    mask[chosen] = True
    return _split(train, mask, spec)


def class_forget(train: Dataset, cls: int) -> ForgetSplit:
    """Forgets every example of one class.

    Args:
      train: a classification training set.
      cls: the class label.

    Returns:
      ``ForgetSplit`` with spec ``"class:<cls>"``.

    Raises:
      ValueError: for regression data, a class with no examples in ``train`` (the message lists the
        classes present), or a training set that holds only this class.
    """
    _check_train(train)
    if train.num_classes is None:
        raise ValueError(
            f"class_forget needs classification data, but {train.name or 'train'} is regression; "
            "use random_forget, ids_forget or predicate_forget."
        )
    if isinstance(cls, bool) or not isinstance(cls, int | np.integer):
        raise ValueError(f"cls must be an integer class label, got cls={cls!r}.")
    mask = train.y == cls
    if not mask.any():
        present = np.unique(train.y).tolist()
        raise ValueError(
            f"class {cls} has no examples in {train.name or 'train'}; the classes present are "
            f"{present}."
        )
    return _split(train, mask, f"class:{int(cls)}")


def ids_forget(train: Dataset, ids: Any) -> ForgetSplit:
    """Forgets the examples with the given ids.

    Args:
      train: the training set.
      ids: ``[M]`` integer ids, all in ``train`` and without repeats.

    Returns:
      ``ForgetSplit`` (forget in training-set order) with spec ``"ids:<M>@<first 12 hex digits of
      forget_ids_hash(ids)>"``: a count alone would not identify the set.

    Raises:
      ValueError: if ``ids`` is empty, repeats an id, names ids not in ``train`` (a few are listed
        with the count), or covers all of ``train``.
    """
    _check_train(train)
    ids = as_id_array(ids)
    spec = f"ids:{ids.size}@{forget_ids_hash(ids)[:12]}"
    if ids.size == 0:
        raise ValueError(f"forget set {spec!r} is empty: no ids were given.")
    repeated = repeated_values(ids)
    if repeated.size:
        raise ValueError(f"forget ids must not repeat, got {describe_values(repeated)}.")
    mask = np.zeros(len(train), bool)
    mask[train.positions(ids)] = True
    return _split(train, mask, spec)


def predicate_forget(
    train: Dataset,
    predicate: Callable[[np.ndarray, np.ndarray, np.ndarray], Any],
    *,
    name: str = "predicate",
) -> ForgetSplit:
    """Forgets a sub-population: the examples where ``predicate(x, y, ids)`` is True.

    Args:
      train: the training set.
      predicate: called once on the whole numpy arrays ``x [N, ...]``, ``y [N, ...]``, ``ids [N]``;
        returns a boolean mask ``[N]`` (e.g. ``lambda x, y, ids: (y == 3) & (x.mean((1, 2, 3)) >
        0.3)``).
      name: a short name for the spec ``"predicate:<name>"``.

    Raises:
      ValueError: if the predicate does not return a boolean ``[N]`` mask, selects nothing, or
        selects everything.
    """
    _check_train(train)
    if not callable(predicate):
        raise TypeError(f"predicate must be callable as predicate(x, y, ids), got {predicate!r}.")
    mask = np.asarray(predicate(train.x, train.y, train.ids))
    if mask.dtype != np.bool_ or mask.shape != (len(train),):
        raise ValueError(
            f"predicate {name!r} must return a boolean mask of shape ({len(train)},), got dtype "
            f"{mask.dtype} shape {mask.shape}."
        )
    return _split(train, mask, f"predicate:{name}")


_SPEC_FORMS = (
    "'class:<int>' (a whole class), 'random:<fraction in (0, 1)>[@seed<int>]', "
    "'ids:<int>,<int>,...' or 'ids:<path to a text or JSON file of integer ids>'"
)
_INT64_MAX = int(np.iinfo(np.int64).max)
_INT_LIST = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*,?\s*$")
_RANDOM = re.compile(r"^\s*([0-9.eE+-]+)\s*(?:@\s*seed\s*(\d+))?\s*$")


def _bad_spec(spec: Any, why: str = "") -> ValueError:
    reason = f" ({why})" if why else ""
    return ValueError(f"bad forget spec {spec!r}{reason}; expected one of: {_SPEC_FORMS}.")


def read_ids_file(path: str) -> np.ndarray:
    """Reads integer ids from a file: JSON (a list, or an object with an ``"ids"`` list) or text.

    Text files hold integers separated by whitespace or commas; ``#`` starts a comment. Every id
    must lie in ``[0, 2**63 - 1]`` (an int64).

    Raises:
      FileNotFoundError: if there is no file at ``path``.
      ValueError: if ``path`` is a directory or unreadable, the file is not UTF-8 text (e.g. binary),
        or it holds something other than integers in range; the message names the file.
    """
    if os.path.isdir(path):
        raise ValueError(
            f"ids file {path!r} is a directory; expected a text or JSON file of integer ids."
        )
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"ids file {path!r} does not exist.") from None
    except OSError as err:
        raise ValueError(f"ids file {path!r} cannot be read ({err.strerror or err}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"ids file {path!r} is not a text file (byte {raw[err.start]:#04x} at offset "
            f"{err.start} is not UTF-8); expected integers separated by whitespace or commas, or "
            "a JSON list of integers."
        ) from None
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"ids file {path!r} looks like JSON but does not parse: {err}."
            ) from None
        if isinstance(values, dict):
            if "ids" not in values:
                raise ValueError(
                    f"ids file {path!r} holds a JSON object without an 'ids' key (keys: "
                    f"{sorted(values)}); expected a list of ints or {{'ids': [...]}}."
                )
            values = values["ids"]
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise ValueError(f"ids file {path!r} must hold a JSON list of integers.")
    else:
        tokens = []
        for line in text.splitlines():
            tokens += line.split("#", 1)[0].replace(",", " ").split()
        bad = [t for t in tokens if not re.fullmatch(r"\d+", t)]
        if bad:
            raise ValueError(
                f"ids file {path!r} holds non-integer entries: {bad[:5]} ({len(bad)} in all)."
            )
        values = [int(t) for t in tokens]
    out_of_range = [v for v in values if not 0 <= v <= _INT64_MAX]
    if out_of_range:
        raise ValueError(
            f"ids file {path!r} holds {out_of_range[0]}, outside the id range [0, 2**63 - 1] "
            f"({len(out_of_range)} such value(s))."
        )
    return np.asarray(values, np.int64)


def select_forget(train: Dataset, spec: str, *, seed: int = 0) -> ForgetSplit:
    """Chooses a forget set from a string, as given on a command line.

    Args:
      train: the training set.
      spec: one of

        * ``"class:3"``: :func:`class_forget` of class 3;
        * ``"random:0.1"``: :func:`random_forget` of 10% with ``seed``; ``"random:0.1@seed3"`` uses
          seed 3 instead of ``seed`` (so a canonical random spec reproduces its split);
        * ``"ids:17,42,99"``: :func:`ids_forget` of these ids;
        * ``"ids:PATH"``: :func:`ids_forget` of the ids in a file (see :func:`read_ids_file`). A
          comma-separated list of integers is read as ids, never as a file name: write ``ids:./17``
          for a file called ``17``.
      seed: the seed for ``random:`` specs without ``@seed``.

    Raises:
      ValueError: for a spec of no known form (the message lists the forms), and for every error of
        the selector it calls.
    """
    if not isinstance(spec, str):
        raise _bad_spec(spec, "not a string")
    mode, colon, arg = spec.strip().partition(":")
    mode = mode.strip().lower()
    if not colon or not arg.strip():
        raise _bad_spec(spec)
    if mode == "class":
        if not re.fullmatch(r"\s*\d+\s*", arg):
            raise _bad_spec(spec, "the class must be a non-negative integer")
        return class_forget(train, int(arg))
    if mode == "random":
        match = _RANDOM.fullmatch(arg)
        try:
            fraction = float(match.group(1)) if match else None
        except ValueError:
            fraction = None
        if fraction is None:
            raise _bad_spec(spec, "the fraction must be a number in (0, 1)")
        return random_forget(train, fraction, seed=int(match.group(2)) if match.group(2) else seed)
    if mode == "ids":
        if _INT_LIST.fullmatch(arg):
            return ids_forget(train, [int(v) for v in arg.split(",") if v.strip()])
        path = os.path.expanduser(arg.strip())
        if not os.path.isfile(path):
            raise _bad_spec(
                spec, f"{arg.strip()!r} is neither a list of integers nor an existing file"
            )
        return ids_forget(train, read_ids_file(path))
    if mode == "predicate":
        raise _bad_spec(spec, "a predicate cannot be given as a string; call predicate_forget")
    raise _bad_spec(spec, f"unknown mode {mode!r}")
