"""The docstring examples of the evaluation modules are run, so they cannot drift from the code."""

import doctest
import importlib

import pytest

MODULES = ["challenge", "klom", "metrics", "mia", "report"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"unlearn_jax.evaluation.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
