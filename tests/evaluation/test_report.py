import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from unlearn_jax.evaluation import mia, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"method": "retrain", "UA": 5.24, "RA": 100.0, "TA": 94.26, "MIA-Efficacy": 12.88, "time": 43},
    {"method": "salun", "UA": 2.85, "RA": 99.62, "TA": 93.93, "MIA-Efficacy": 14.39, "time": 2.7},
    {"method": "ft", "UA": 0.63, "RA": 99.88, "TA": 94.06, "MIA-Efficacy": 2.70},
]


def test_format_table_by_hand():
    text = report.format_table(
        ROWS, ["method", "UA", "MIA-Efficacy", "time"], formats={"time": ".1f"}
    )
    assert text.splitlines() == [
        "method     UA  MIA-Efficacy  time",
        "-------  ----  ------------  ----",
        "retrain  5.24         12.88    43",
        "salun    2.85         14.39   2.7",
        "ft       0.63          2.70     -",
    ]
    nan_row = report.format_table([{"a": float("nan"), "b": np.float32(0.5)}], float_format=".3f")
    assert nan_row.splitlines()[-1] == "nan  0.500"
    with pytest.raises(ValueError, match="at least one row"):
        report.format_table([])


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_plot_gap_bars_writes_a_png(tmp_path):
    path = report.plot_gap_bars(ROWS, tmp_path / "plots" / "gaps.png")
    _assert_png(path)
    with pytest.raises(ValueError, match="exactly one row with method='retrain'"):
        report.plot_gap_bars(ROWS[1:], tmp_path / "x.png")


def test_plot_roc_curves_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    curves = {}
    for name, strength in (("loss", 1.0), ("lira", 3.0)):
        fpr, tpr, _ = mia.roc_curve(rng.normal(size=300) + strength * labels, labels)
        curves[name] = (fpr, tpr)
    _assert_png(report.plot_roc_curves(curves, tmp_path / "roc.png"))
    _assert_png(report.plot_roc_curves(curves, tmp_path / "roc_linear.png", log_scale=False))
    with pytest.raises(ValueError, match="curves is empty"):
        report.plot_roc_curves({}, tmp_path / "none.png")


def test_write_json_round_trips_numpy_and_jax_values(tmp_path):
    Point = collections.namedtuple("Point", ["fpr", "tpr"])
    obj = {
        "UA": np.float32(2.5),
        "n": np.int64(7),
        "flag": np.bool_(True),
        "jax_scalar": jnp.asarray(0.25),
        "array": np.arange(6, dtype=np.int32).reshape(2, 3),
        "jax_array": jnp.array([0.5, 1.5]),
        "roc": Point(np.array([0.0, 1.0]), (0.0, 1.0)),
        "rows": ROWS,
        3: "int key",
        "bad": float("nan"),
    }
    path = report.write_json(tmp_path / "out" / "metrics.json", obj)
    loaded = json.loads(path.read_text())
    assert loaded == {
        "UA": 2.5,
        "n": 7,
        "flag": True,
        "jax_scalar": 0.25,
        "array": [[0, 1, 2], [3, 4, 5]],
        "jax_array": [0.5, 1.5],
        "roc": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]},
        "rows": ROWS,
        "3": "int key",
        "bad": None,  # strict JSON has no NaN
    }
    with pytest.raises(TypeError, match=r"obj\['x'\] of type object"):
        report.write_json(tmp_path / "bad.json", {"x": object()})
