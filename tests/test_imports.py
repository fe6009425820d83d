import importlib

import pytest


@pytest.mark.parametrize("name", ["jaxq", "pallas_kernels", "models"])
def test_import_roots(name):
    module = importlib.import_module(name)
    assert module.__doc__
