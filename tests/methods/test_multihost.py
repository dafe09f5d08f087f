"""Two JAX processes (CPU devices, gloo collectives, 127.0.0.1) train a few steps, unlearn with SSD
and with NPO on one global mesh, save and restore the result sharded, and agree with the same run
in one process without a mesh. The processes run :mod:`tests.multihost_check` (``unlearning``)."""

import jax
import numpy as np
import pytest

from tests import multihost_check

# See tests/checkpoint/test_store.py: orbax's closed event loop, reported during a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
RTOL, ATOL = 1e-5, 1e-6  # float32 sums across 4 devices in another order


def test_two_processes_train_unlearn_save_and_agree_with_one(tmp_path):
    reference = multihost_check.train_and_unlearn(mesh=None)
    results = multihost_check.run(["unlearning"], tmp_path)
    for out in (r["checks"]["unlearning"] for r in results):
        for name in ("trained", "ssd", "npo"):
            jax.tree.map(
                lambda got, want, name=name: np.testing.assert_allclose(
                    np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=name
                ),
                out["params"][name],
                reference[name],
                is_leaf=lambda v: isinstance(v, list),
            )
        assert out["ssd_selected"] == reference["ssd_selected"] > 0
        np.testing.assert_allclose(out["npo_loss"], reference["npo_loss"], rtol=1e-5)
        assert out["restored_equal"] and out["restored_method"] == "npo"
