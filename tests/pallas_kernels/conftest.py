"""Fixtures shared by the Mosaic GPU kernel tests."""
import pytest


@pytest.fixture
def promotions(monkeypatch):
    """The partial-product promotions (_mgpu.scaled_sum) traced during the test, as (partial shape, row-scale
    dtype or None); clear it between traces. Jit caches are cleared first, so that a kernel an earlier test
    ran is traced again."""
    import jax

    from pallas_kernels import _mgpu
    jax.clear_caches()
    calls = []
    scaled_sum = _mgpu.scaled_sum

    def recording(acc, part, row_scale=None, col_scale=None):
        calls.append((part.shape, None if row_scale is None else row_scale.dtype))
        return scaled_sum(acc, part, row_scale, col_scale)

    monkeypatch.setattr(_mgpu, "scaled_sum", recording)
    return calls
