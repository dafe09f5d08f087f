"""Reports: fixed-width text tables, JSON files of metrics, and PNG plots.

Plots are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas directly, so importing or
calling this module never touches pyplot's global backend or opens a window.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_jax.evaluation.metrics import TABLE_KEYS, gap_to_retrain

Formatter = str | Callable[[Any], str]


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """0-d numpy / JAX arrays as Python scalars; everything else unchanged."""
    if hasattr(value, "shape") and np.shape(value) == ():
        return np.asarray(value).item()
    return value


def _is_number(value: Any) -> bool:
    value = _plain(value)
    return isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)


def _format_cell(value: Any, formatter: Formatter) -> str:
    if value is None:
        return "-"
    value = _plain(value)
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if _is_number(value):
        if not math.isfinite(float(value)):
            return str(float(value))
        if callable(formatter):
            return formatter(value)
        return format(float(value), formatter)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    float_format: Formatter = ".2f",
    formats: Mapping[str, Formatter] | None = None,
) -> str:
    """A fixed-width text table, one line per row dict.

    Floats are formatted with ``float_format`` (a format spec such as ``".2f"`` or a callable), or
    per column with ``formats``; ints and strings are printed as they are, missing values as ``-``,
    NaN as ``nan``. Numbers are right-aligned, text left-aligned; columns are as wide as their widest
    cell.

    Args:
      rows: e.g. ``[{"method": "retrain", "UA": 5.24, ...}, {"method": "salun", ...}]``.
      columns: keys to show, in order; default: every key in order of first appearance.
      float_format: default float format.
      formats: per-column overrides.

    Returns:
      The table as one string: a header line, a rule of dashes, then the rows (no trailing newline).

    Raises:
      ValueError: if there are no rows or no columns.

    Examples:
      >>> print(format_table([{"method": "retrain", "UA": 5.241}, {"method": "ft", "UA": 1.0}]))
      method     UA
      -------  ----
      retrain  5.24
      ft       1.00
    """
    if not rows:
        raise ValueError("format_table needs at least one row.")
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    if not columns:
        raise ValueError("format_table needs at least one column.")
    formats = dict(formats or {})
    cells = [
        [_format_cell(row.get(col), formats.get(col, float_format)) for col in columns]
        for row in rows
    ]
    numeric = [
        all(_is_number(row.get(col)) or row.get(col) is None for row in rows)
        and any(row.get(col) is not None for row in rows)
        for col in columns
    ]
    widths = [max(len(str(col)), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line([str(c) for c in columns]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------
def to_jsonable(obj: Any, _where: str = "obj") -> Any:
    """Converts metrics and results to plain JSON types.

    numpy / JAX scalars become Python numbers, arrays nested lists, tuples lists, NamedTuples and
    dataclasses dicts, paths strings, mapping keys strings. Non-finite floats become ``None`` (JSON
    has no NaN or infinity).

    Raises:
      TypeError: naming the offending entry, for anything else.
    """
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "_asdict"):
        return to_jsonable(obj._asdict(), _where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return to_jsonable(fields, _where)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{_where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "__array__") or isinstance(obj, np.ndarray):
        arr = np.asarray(obj)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{_where} is an array of dtype {arr.dtype}, which JSON cannot hold.")
        if arr.ndim == 0:
            return to_jsonable(arr.item(), _where)
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(arr.tolist())]
    raise TypeError(f"{_where} of type {type(obj).__name__} cannot be written to JSON.")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Writes ``obj`` (metrics, rows, results with numpy/JAX values) as JSON; creates parent folders.

    Values are converted by :func:`to_jsonable` (non-finite floats are written as ``null``); the
    output is strict JSON, keys in their given order.

    Returns:
      The path written.
    """
    path = Path(path)
    data = to_jsonable(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, allow_nan=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------
def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def plot_gap_bars(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    keys: Sequence[str] = TABLE_KEYS,
    name_key: str = "method",
    retrain_name: str = "retrain",
) -> Path:
    """Grouped bars of each method's absolute gap to retraining per metric, plus the average gap.

    Args:
      rows: row dicts with a ``name_key`` entry and the metrics in ``keys``; exactly one row is the
        retrained model (``row[name_key] == retrain_name``).
      path: the PNG to write (parent folders are created).
      keys: metrics to compare (default UA, RA, TA, MIA-Efficacy).
      name_key: the key holding each row's name.
      retrain_name: the name of the retrain row.

    Returns:
      The path written.

    Raises:
      ValueError: without exactly one retrain row or without any other row; KeyError for a missing
        metric (from :func:`gap_to_retrain`).
    """
    names = [row.get(name_key) for row in rows]
    retrain = [row for row in rows if row.get(name_key) == retrain_name]
    if len(retrain) != 1:
        raise ValueError(
            f"rows must contain exactly one row with {name_key}={retrain_name!r}; names are {names}."
        )
    methods = [row for row in rows if row.get(name_key) != retrain_name]
    if not methods:
        raise ValueError("rows hold only the retrain row; nothing to compare with it.")
    gaps = [gap_to_retrain(row, retrain[0], keys) for row in methods]
    labels = [*keys, "avg_gap"]
    values = np.array([[g[f"gap/{k}"] for k in keys] + [g["avg_gap"]] for g in gaps])

    fig = _new_figure((max(6.0, 1.2 * len(labels) + 0.4 * len(methods)), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.8 / len(methods)
    for i, row in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values[i], width, label=str(row[name_key]))
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("|method - retrain|")
    ax.set_title("Gap to retrain (lower is better)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_roc_curves(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    *,
    log_scale: bool = True,
) -> Path:
    """ROC curves of membership-inference attacks, one line each, with the chance diagonal.

    Args:
      curves: name -> ``(fpr, tpr)`` arrays (e.g. from :func:`unlearn_jax.evaluation.mia.roc_curve`).
        The legend shows each curve's trapezoidal AUC.
      path: the PNG to write (parent folders are created).
      log_scale: log-log axes (Carlini et al.'s view of the low-FPR regime); zeros are clipped to the
        smallest positive rate of the plot.

    Returns:
      The path written.

    Raises:
      ValueError: if ``curves`` is empty or a curve's arrays differ in length or are empty.
    """
    if not curves:
        raise ValueError("curves is empty; pass {name: (fpr, tpr)}.")
    fig = _new_figure((5.0, 5.0))
    ax = fig.add_subplot()
    positive = []
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size == 0:
            raise ValueError(
                f"curve {name!r}: fpr and tpr must be non-empty 1-D arrays of the same length, got "
                f"shapes {fpr.shape} and {tpr.shape}."
            )
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
        positive.extend(v for v in (fpr[fpr > 0].min(initial=1.0), tpr[tpr > 0].min(initial=1.0)))
    low = min(positive) if log_scale else 0.0
    ax.plot([low, 1.0], [low, 1.0], "k--", linewidth=0.8, label="chance")
    if log_scale:
        ax.set_xscale("log", nonpositive="clip")
        ax.set_yscale("log", nonpositive="clip")
        ax.set_xlim(low, 1.0)
        ax.set_ylim(low, 1.0)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Membership inference ROC")
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)
