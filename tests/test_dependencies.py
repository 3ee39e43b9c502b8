"""Required dependencies import: a broken install fails here instead of skipping tests."""

import importlib

import pytest


@pytest.mark.parametrize("module", ["reasoning_gym", "pyarrow", "pyarrow.parquet", "math_verify", "gguf"])
def test_required_dependency_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("module", ["tensorboardX", "wandb"])
def test_the_test_environment_has_the_reporter_extras(module):
    """scripts/setup.sh installs the tensorboard and wandb extras, which the reporter tests use."""
    importlib.import_module(module)
