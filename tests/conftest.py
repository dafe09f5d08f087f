"""Strict numerics for the whole suite (lineax/levanter style): rank promotion raises, so a silently
broadcast ``[B] + [B, 1]`` shows up as an error rather than a wrong number."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
