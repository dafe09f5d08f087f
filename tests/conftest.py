"""Strict numerics for the whole suite (lineax/levanter style): rank promotion raises, so a silently
broadcast ``[B] + [B, 1]`` shows up as an error rather than a wrong number."""

import os

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# The command line switches on JAX's persistent compilation cache; the CLI tests run it in this
# process, where it would change JAX's global config for every later test.
os.environ["UNLEARN_JAX_CACHE"] = "off"
