"""Strict numerics for the whole suite (lineax/levanter style): rank promotion raises, so a silently
broadcast ``[B] + [B, 1]`` shows up as an error rather than a wrong number."""

import os

# Most of the suite's time is XLA compiling many small programs, not running them: LLVM's
# optimisation level 0 compiles them about 20% faster. It is set before JAX creates its CPU client
# (which reads XLA_FLAGS once) and inherited by the subprocesses of the sharding tests.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# The command line switches on JAX's persistent compilation cache; the CLI tests run it in this
# process, where it would change JAX's global config for every later test.
os.environ["UNLEARN_JAX_CACHE"] = "off"

# Tests that run processes of their own (8 fake devices, two hosts) take the longest: collected
# first, pytest-xdist hands their files out first (--no-loadscope-reorder keeps collection order),
# so they run beside the rest instead of after it.
_FIRST = (
    "tests/methods/test_sharded.py",
    "tests/methods/test_multihost.py",
    "tests/test_sharding_rules.py",
    "tests/checkpoint/test_multihost.py",
    "tests/test_sharding.py",
)


def pytest_collection_modifyitems(config, items):
    del config
    rank = {path: i for i, path in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(_FIRST)))
