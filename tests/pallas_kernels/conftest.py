"""Fixtures shared by the Mosaic GPU kernel tests: what the kernels trace (promotions, wgmma operands)."""
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


@pytest.fixture
def wgmma_operands(monkeypatch):
    """The A operand (a ShapeDtypeStruct) of each plgpu.wgmma that later traces emit. Jit caches are cleared
    first: a kernel already traced in this process (on a GPU, by the tests that run the kernels) would
    otherwise be served from the cache without tracing again, and record nothing."""
    import jax
    import jax.experimental.pallas.mosaic_gpu as plgpu

    jax.clear_caches()
    operands = []
    wgmma = plgpu.wgmma

    def recording_wgmma(acc, a, b):
        operands.append(jax.ShapeDtypeStruct(a.shape, a.dtype))
        return wgmma(acc, a, b)

    monkeypatch.setattr(plgpu, "wgmma", recording_wgmma)
    return operands
