"""W4A16 (INT4 weights with per-group scales, optional zeros, bf16 activations) on Hopper with the Mosaic
GPU lowering, for every M from 2 tokens up (padded to a token tile of 8 or more): the weights are wgmma's
A operand, decoded in registers.

The product is computed transposed (swap-AB): y^T [N, M] = W [N, K] @ x^T. Each compute warpgroup owns 64
output channels (wgmma's M side, 64 per instruction; or 128 as two, MgpuW4Config.wg_channels, so one x tile
serves twice the weights: planned for W4A16 on wide layers at small M, 7-12 % less device time on the Llama
gate_up layers, runs 102-103) and `tile_tokens` tokens (wgmma's N side, 8..256), so a batch of 16 tokens
wastes no MMA rows and a prefill tile is as wide as wgmma allows. On the skeleton of
_mgpu.py (persistent tiles, a TMA producer warpgroup, two compute warpgroups side by side along the
channels), per 128-K step each compute warpgroup
  1. loads its INT4 tile [64 (or 128), 128] from shared memory in Mosaic's 4-bit upcast register layout
     (flipping bit 3 of each canonical code u = q + 8 into q), moves it to the wgmma operand layout while
     still 4-bit, and converts it to bf16 (q in [-8, 7], exact),
  2. applies the group's zero and scale per channel in bf16: a = (q - (zero - 8)) * scale, one rounding,
  3. issues one wgmma per group (one for group 128, two for 64, four for 32) of a (registers) against the
     step's x tile (shared memory, read transposed) into the warpgroup's f32 accumulator, which runs across
     all of K,
where a pipeline step may hold two or four such 128-K steps (MgpuW4Config.sub_steps, planned for token tiles
under 128): every tile goes through 1-2 before the first wgmma, which gives each warp more independent decode
work per wait (two: 3-14 % less device time at M=16 / 64 on the H200, run 96; four at M=16: up to 9 % more,
run 98); the epilogue writes the accumulator transposed (a register transpose and a transposed shared-memory
store), so y comes out [M, N] with no extra pass.

Numerics: the dequantised weight is rounded to bf16 once, (q - z) * s, as the 'xla_dequant' path and
peer kernels (Marlin, Machete) do; products and sums are f32. Scales and zeros enter as bf16 (exact for
bf16 checkpoints; an f16 or f32 scale is rounded to bf16 first). Tolerance against
w4a16.w4a16_matmul_reference: |y - ref| <= 1e-2 |ref| + 1e-2 rms(ref) + 2**-8 (|x| @ |W|^T), the last term
for the weight rounding where an output cancels (an H100 run met an element 2.5 % of rms off the first two
terms alone, with |x| @ |W|^T at 21 rms).

Inputs: x bf16 [M, K]; the canonical packed uint8 [N, K/2] (codes u = q + 8, low nibble = even k), read
through an int4 view of the same bytes (no pass; measured as fast as weights converted beforehand by
`as_int4`, which the kernel also takes); scale [N, K/G] and zero [N, K/G] (optional) as rows per K-step
([K/G, N], transposed here).
Shapes: group G in 128, 64, 32 (W4A8: 128), K % 128 == 0, N % 128 == 0 (N % 256 with 128-channel
warpgroups); M is padded to tile_tokens.
The kernel needs a Hopper GPU and jax >= 0.11 (no interpret mode): CPU CI checks its rules and that it
lowers; benchmarks/gemm_probe.py --parts w4mgpu checks it against the reference on a GPU.

w4a8_matmul_mgpu is the same grid for W4A8 on FP8 tensor cores, the dispatcher's W4A8 path from M=2: the
INT4 tile becomes e4m3 in registers (exact), each K-step's e4m3 wgmma goes to a fresh accumulator that is
promoted with weight_scale * input_scale per channel (the FP8 block kernel's scheme). Measured on the H100
(gemm_probe.py --parts w4a8mgpu, runs 17-18): faster than this kernel on the widened codes from M=256 on
every 8B layer and more exact (products and per-step sums exact).

Tried on the H100 and removed (runs 18-26, benchmarks/results/gemm_notes.md): leaving each wgmma in flight
over the next step's decode (wrong results; on the H200, run 94: the next decode reuses the registers of the
A operand while the tensor cores still read them, and no faster at M=16), applying the group scale to each
step's partial product in f32 instead of to the weights, and promoting W4A8's step b-1 while step b's wgmma
runs (both within noise).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _mgpu

GROUP = 128                                             # K per pipeline step
GROUPS = (32, 64, 128)                                  # quantization groups the kernel takes
WG_CHANNELS = 64                                        # wgmma's M: output channels per compute warpgroup
CTA_CHANNELS = 2 * WG_CHANNELS
SCALE_ROW_BYTES = 16                                    # channel-major scales: bytes per channel per TMA row
SUB_STEPS = (1, 2, 4)                                   # 128-K sub-steps a pipeline step may hold


@dataclasses.dataclass(frozen=True)
class MgpuW4Config:
    """tile_tokens: tokens per CTA tile (wgmma N, a multiple of 8 up to 256); stages: K-steps in flight
    (shared memory per stage: tile_tokens * 256 + 8 KiB); grid_tile_width: tiles per band of the snake
    order; epi_tokens: tokens per epilogue store (at most tile_tokens); split_k: K ranges computed by
    separate tiles into f32 partial products that one XLA fusion sums (fills the SMs when N and M are
    small); chain_tiles: a CTA's tiles as one pipeline of pipelines (_mgpu.persistent_kernel), stages cut to
    the largest divisor of the K-steps per tile; sub_steps: 128-K sub-steps per pipeline step (1, 2 or 4), all
    decoded before the step's first wgmma (shared memory per stage times sub_steps); wg_channels: output
    channels per compute warpgroup (64, or 128 as two 64-row wgmmas per group slice, W4A16 only), so a CTA
    tile spans 2 * wg_channels channels and one x tile serves twice the weights."""

    tile_tokens: int = 128
    stages: int = 4
    grid_tile_width: int = 8
    epi_tokens: int = 32
    split_k: int = 1
    chain_tiles: bool = False
    sub_steps: int = 1
    wg_channels: int = WG_CHANNELS


DEFAULT = MgpuW4Config()


def can_use(m: int, n: int, k: int, group: int, cfg: MgpuW4Config = DEFAULT) -> bool:
    """Shapes and configs this kernel takes (callers check it, with a GPU backend, before calling)."""
    t = cfg.tile_tokens
    return (group in GROUPS and k % (GROUP * cfg.split_k * cfg.sub_steps) == 0 and cfg.wg_channels in (64, 128)
            and n % (2 * cfg.wg_channels) == 0
            and m >= 1 and t % 8 == 0 and 8 <= t <= 256 and t % _epi_tokens(cfg) == 0 and cfg.epi_tokens % 8 == 0
            and cfg.stages >= 2 and cfg.sub_steps in SUB_STEPS)


SMEM_BYTES = 232448                                     # a Hopper CTA's shared memory (227 KiB)


def fit_stages(tile_tokens: int, most: int = 8, split_k: int = 1, asym: bool = True, x_bytes: int = 2,
               scale_rows: int = 1, sub_steps: int = 1, wg_channels: int = WG_CHANNELS) -> int:
    """The most K-steps in flight (<= most) whose operand buffers (each rounded to 1 KiB; x_bytes per
    activation: 2 for bf16, 1 for e4m3; scale_rows bf16 rows of 128 channels per step: 128 / group) and
    epilogue (f32 with split_k > 1) fit in shared memory, with room for the barriers (measured: 4 KiB); a
    stage of sub_steps 128-K sub-steps holds sub_steps of each; CTA tiles of 2 * wg_channels channels."""
    kib = lambda b: -(-b // 1024) * 1024  # noqa: E731
    cta = 2 * wg_channels
    rows = kib(scale_rows * cta * 2) + (kib(cta * 2) if asym else 0)
    per_stage = (kib(tile_tokens * GROUP * x_bytes) + kib(cta * GROUP // 2) + rows) * sub_steps
    epilogue = 2 * 2 * min(DEFAULT.epi_tokens, tile_tokens) * wg_channels * (4 if split_k > 1 else 2)
    return max(min(most, (SMEM_BYTES - epilogue - 4608) // per_stage), 1)


def _epi_tokens(cfg: MgpuW4Config) -> int:
    return min(cfg.epi_tokens, cfg.tile_tokens)


def as_int4(packed: jax.Array) -> jax.Array:
    """Canonical uint8 [N, K/2] (u = q + 8) -> int4 [N, K] holding q (low nibble first, as XLA packs int4)."""
    n = packed.shape[0]
    return lax.bitcast_convert_type(packed ^ jnp.uint8(0x88), jnp.int4).reshape(n, -1)


def bits_as_int4(packed: jax.Array) -> jax.Array:
    """Canonical uint8 [N, K/2] -> int4 [N, K] of the same bits (u read as signed; the kernel flips bit 3)."""
    return lax.bitcast_convert_type(packed, jnp.int4).reshape(packed.shape[0], -1)


def channel_values(ref, channels, j: int = 0):
    """Row j of a step's [rows, 128-channel] block of per-channel values (scales, zeros): this warpgroup's 64
    channels as a vector in the WGMMA row layout."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return plgpu.load(ref.at[j, channels], (), layout=plgpu.Layout.WGMMA.reduce(1))


def per_channel_row(ref, j: int, channels, shape):
    """channel_values(ref, channels, j) broadcast over a [64, columns] slice of the warpgroup's A tile."""
    return lax.broadcast_in_dim(channel_values(ref, channels, j), shape, [0])


def _step(wg, _scratch, *refs, flip: bool, group: int = GROUP, sub_steps: int = 1):
    """One pipeline step of a compute warpgroup, sub_steps 128-K sub-steps: each sub-step's [64, 128] INT4
    tile decoded to bf16 in registers (WGMMA layout, exact; flip: the tile holds the canonical codes u = q + 8
    as int4 bits, turned into q by flipping bit 3), per group of `group` columns its zero and scale applied,
    and one wgmma per group slice into the running accumulator (x is swizzled for slices of `group` columns):
    with one sub-step each slice's wgmma as soon as it is scaled, with more only after every tile is decoded,
    which gives the warps independent work to interleave and leaves only wgmma issues between the first
    wgmma and the wait (run 96).
    refs: the sub-steps' x tiles, their weight tiles, the step's scale rows (GROUP // group per sub-step),
    optionally its zero rows, then the accumulator ref."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    x_smems, w_smems = refs[:sub_steps], refs[sub_steps:2 * sub_steps]
    s_smem, *zero_smem, acc_ref = refs[2 * sub_steps:]
    wg_channels = w_smems[0].shape[0] // 2
    channels = pl.ds(wg * wg_channels, wg_channels)
    whole, per_sub = group == GROUP, GROUP // group
    products = []                                       # (scaled weight slice, its x slice)
    for h, (x_smem, w_smem) in enumerate(zip(x_smems, w_smems)):
        q = plgpu.load(w_smem.at[channels], (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
        if flip:
            q = q ^ jnp.int4(-8)
        a = plgpu.layout_cast(q, plgpu.Layout.WGMMA).astype(jnp.bfloat16)
        for j in range(per_sub):
            row = h * per_sub + j
            a_j = a if whole else a[:, j * group:(j + 1) * group]
            x_j = x_smem if whole else x_smem.at[:, pl.ds(j * group, group)]
            if zero_smem:
                a_j = a_j - per_channel_row(zero_smem[0], row, channels, a_j.shape)
            a_j = a_j * per_channel_row(s_smem, row, channels, a_j.shape)
            if sub_steps == 1:                          # as measured before sub-steps: each slice's wgmma at once
                plgpu.wgmma(acc_ref, a_j, x_j.T)
            else:
                products.append((a_j, x_j))
    for a_j, x_j in products:
        plgpu.wgmma(acc_ref, a_j, x_j.T)
    plgpu.wgmma_wait(0)
    return acc_ref


def _e4m3_tile(wg, w_smem, flip: bool):
    """The warpgroup's INT4 tile as e4m3 in registers (exact), the channels it covers."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    channels = pl.ds(wg * WG_CHANNELS, WG_CHANNELS)
    q = plgpu.load(w_smem.at[channels], (), layout=plgpu.Layout.WGMMA_8BIT)
    if flip:
        q = q ^ jnp.int4(-8)
    return q.astype(jnp.float8_e4m3fn), channels


def _step_fp8(wg, _scratch, *refs, flip: bool, sub_steps: int = 1):
    """W4A8 on FP8 tensor cores, one pipeline step of a compute warpgroup, sub_steps 128-K sub-steps: each
    sub-step's INT4 tile converted to e4m3 in registers (exact), every tile's e4m3 wgmma into a fresh
    accumulator of its own, then each promoted into the f32 register sum acc in sub-step order with its
    per-channel scale row (weight_scale * input_scale): the same sums in the same order as one sub-step per
    pipeline step. refs: the sub-steps' x tiles, their weight tiles, the step's scale rows, then acc."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    x_smems, w_smems = refs[:sub_steps], refs[sub_steps:2 * sub_steps]
    s_smem, acc = refs[2 * sub_steps:]
    tiles = [_e4m3_tile(wg, w_smem, flip) for w_smem in w_smems]
    channels = tiles[0][1]

    def mma(*acc_refs):
        for acc_ref, (a, _), x_smem in zip(acc_refs, tiles, x_smems):
            plgpu.wgmma(acc_ref, a, x_smem.T)
        return [acc_ref[...] for acc_ref in acc_refs]

    fresh = plgpu.ACC((WG_CHANNELS, acc.shape[1]), jnp.float32)
    parts = pl.run_scoped(mma, *[fresh] * sub_steps)
    for h, part in enumerate(parts):
        acc = _mgpu.scaled_sum(acc, part, row_scale=channel_values(s_smem, channels, h))
    return acc


def step_rows(scale, zero=None) -> tuple:
    """What w4a16_matmul_mgpu's kernel reads per K-step, from scale and zero [N, K/G]: the scale as bf16
    [K/G, N] and, asymmetric, zero - 8 as bf16 [K/G, N] (in [-8, 7]: exact). Two small XLA passes per call
    when the kernel builds them itself; computed once at load time and passed as `rows`, no pass."""
    rows = (scale.astype(jnp.bfloat16).T,)
    return rows if zero is None else rows + ((zero.astype(jnp.float32) - 8.0).astype(jnp.bfloat16).T,)


def w4a8_step_rows(weight_scale, input_scale) -> tuple:
    """w4a8_matmul_mgpu's per-step rows: weight_scale [N, K/128] * input_scale as f32 [K/128, N]."""
    return ((weight_scale.astype(jnp.float32) * jnp.asarray(input_scale, jnp.float32)).T,)


def check_rows(fn: str, rows, want: tuple):
    """rows must be what step_rows / w4a8_step_rows build for these weights: the (shape, dtype) of each row
    array as in want."""
    got = tuple((r.shape, r.dtype) for r in rows)
    if got != want:
        raise ValueError(f"{fn}: rows {got} do not match the weights: expected {want} (build them with "
                         "step_rows / w4a8_step_rows from the same scales)")


@functools.partial(jax.jit, static_argnames=("config",))
def w4a16_matmul_mgpu(x, packed, scale, zero=None, *, config: MgpuW4Config = DEFAULT, rows=None):
    """y [M, N] bf16 = x [M, K] bf16 @ W^T, W = (q - (zero - 8)) * scale per group of G = K / scale.shape[1]
    in GROUPS (zero None: symmetric, W = q * scale). packed: w4a16.py's canonical uint8 [N, K/2] (read as is:
    its int4 view costs no pass), or as_int4's int4 [N, K]; scale, zero: [N, K/G]. rows: step_rows(scale,
    zero) computed beforehand (then scale and zero give only the shapes), or None to build them here. Groups
    of 32 and 64 run one wgmma per group (checked and timed on an H100: dispatch.py's MGPU_W4_TILE notes)."""
    return w4a16_matmul_mgpu_group(x, (packed,), (scale,), None if zero is None else (zero,), config=config,
                                   rows=None if rows is None else (rows,))


@functools.partial(jax.jit, static_argnames=("config",))
def w4a16_matmul_mgpu_group(x, packed: tuple, scale: tuple, zero: tuple | None = None, *,
                            config: MgpuW4Config = DEFAULT, rows: tuple | None = None):
    """Several W4A16 weights that share x (q, k and v; gate and up) in one launch: y [M, N_0 + N_1 + ...]
    bf16 holds x @ W_s^T for each weight s side by side, each exactly as w4a16_matmul_mgpu computes it alone
    (the grid's 128-channel tiles run weight s's pipeline where they fall in its channels). packed, scale,
    zero, rows: one entry per weight, as w4a16_matmul_mgpu takes them; every weight has the same K, group,
    packing and symmetry (zero None: all symmetric). config is the tiling of the whole [M, sum N] product.
    One launch instead of one per weight: at M=16 the 2 MB k / v weights of Llama-3.1-8B took ~13 us each,
    as long as the fused 12.6 MB qkv (H100, gemm_notes.md)."""
    cfg = config
    m, k = x.shape
    zeros = (None,) * len(packed) if zero is None else zero
    rows = (None,) * len(packed) if rows is None else rows
    if not (len(packed) == len(scale) == len(zeros) == len(rows) >= 1):
        raise ValueError(f"w4a16_matmul_mgpu_group: {len(packed)} packed, {len(scale)} scale, {len(zeros)} zero "
                         f"and {len(rows)} rows entries; expected one of each per weight")
    checked = []
    for i, (p, s, z, r) in enumerate(zip(packed, scale, zeros, rows)):
        n = p.shape[0]
        want = (n, k) if p.dtype == jnp.int4 else (n, k // 2)
        group = k // max(s.shape[-1], 1)
        groups = (n, k // group)
        same = p.dtype == packed[0].dtype and s.shape[1] == scale[0].shape[1] and (z is None) == (zeros[0] is None)
        if (p.shape != want or s.shape != groups or group not in GROUPS or group * s.shape[1] != k or not same
                or (z is not None and z.shape != groups) or not can_use(m, n, k, group, cfg)):
            raise ValueError(f"w4a16_matmul_mgpu: weight {i}: x {x.shape}, packed {p.shape} {p.dtype}, scale "
                             f"{s.shape}, zero {None if z is None else z.shape} do not fit {cfg} (needs packed uint8 "
                             f"(N, K/2) or int4 (N, K), scale and zero (N, K/G) for G in {GROUPS}, K % (128 * "
                             f"split_k * sub_steps) == 0, N % {2 * cfg.wg_channels} == 0, and one packing and group "
                             "for every weight of a group)")
        r = step_rows(s, z) if r is None else r
        check_rows("w4a16_matmul_mgpu", r, ((groups[::-1], jnp.dtype(jnp.bfloat16)),) * (1 if z is None else 2))
        checked.append(list(r))
    group = k // scale[0].shape[1]
    step = functools.partial(_step, group=group, sub_steps=cfg.sub_steps)
    return launch_swap_ab(x.astype(jnp.bfloat16), list(packed), checked, cfg, step, acc_in_ref=True, sub_k=group)


@functools.partial(jax.jit, static_argnames=("config",))
def w4a8_matmul_mgpu(xq, input_scale, packed, weight_scale, *, config: MgpuW4Config = DEFAULT, rows=None):
    """W4A8 on FP8 tensor cores: y [M, N] bf16 =
    sum over K-steps of (xq @ q^T)_step * weight_scale[:, step] * input_scale, from E4M3 activation codes xq
    [M, K], the canonical packed uint8 [N, K/2] (or as_int4's int4), weight_scale [N, K/128]; the products
    and per-step sums are exact (e4m3 x int4), so only the f32 promotion order differs from
    w4a8.w4a8_matmul_reference. tile_tokens <= 128 (a fresh accumulator beside the sum). rows:
    w4a8_step_rows(weight_scale, input_scale) computed beforehand, or None to build them here."""
    return w4a8_matmul_mgpu_group((xq,), (input_scale,), (packed,), (weight_scale,), config=config,
                                  rows=None if rows is None else (rows,))


@functools.partial(jax.jit, static_argnames=("config",))
def w4a8_matmul_mgpu_group(xq: tuple, input_scale: tuple, packed: tuple, weight_scale: tuple, *,
                           config: MgpuW4Config = DEFAULT, rows: tuple | None = None):
    """Several W4A8 weights that share an input (q, k and v; gate and up) in one launch: y [M, N_0 + N_1 + ...]
    bf16, each weight's columns exactly as w4a8_matmul_mgpu computes them alone. Each weight s brings its own
    activation codes xq[s] = e4m3(x / input_scale[s]) [M, K], so weights calibrated to different input
    scales group as well; xq, input_scale, packed, weight_scale, rows: one entry per weight, as
    w4a8_matmul_mgpu takes them. config is the tiling of the whole [M, sum N] product."""
    cfg = config
    rows = (None,) * len(packed) if rows is None else rows
    if not (len(xq) == len(input_scale) == len(packed) == len(weight_scale) == len(rows) >= 1):
        raise ValueError(f"w4a8_matmul_mgpu_group: {len(xq)} xq, {len(input_scale)} input_scale, {len(packed)} "
                         f"packed, {len(weight_scale)} weight_scale and {len(rows)} rows entries; expected one of "
                         "each per weight")
    m, k = xq[0].shape
    checked = []
    for i, (x_s, s_in, p, ws, r) in enumerate(zip(xq, input_scale, packed, weight_scale, rows)):
        n = p.shape[0]
        want = (n, k) if p.dtype == jnp.int4 else (n, k // 2)
        if (x_s.dtype != jnp.float8_e4m3fn or x_s.shape != (m, k) or p.shape != want or p.dtype != packed[0].dtype
                or ws.shape != (n, k // GROUP) or cfg.tile_tokens > 128 or cfg.wg_channels != WG_CHANNELS
                or not can_use(m, n, k, GROUP, cfg)):
            raise ValueError(f"w4a8_matmul_mgpu: weight {i}: xq {x_s.shape} {x_s.dtype}, packed {p.shape} {p.dtype}, "
                             f"weight_scale {ws.shape} do not fit {cfg} (needs e4m3 xq (M, K) alike for every "
                             "weight, packed uint8 (N, K/2) or int4 (N, K) alike, weight_scale (N, K/128), "
                             "K % (128 * split_k * sub_steps) == 0, N % 128 == 0, tile_tokens <= 128, wg_channels 64)")
        r = w4a8_step_rows(ws, s_in) if r is None else r
        check_rows("w4a8_matmul_mgpu", r, (((k // GROUP, n), jnp.dtype(jnp.float32)),))
        checked.append(list(r))
    step = functools.partial(_step_fp8, sub_steps=cfg.sub_steps)
    return launch_swap_ab(list(xq), list(packed), checked, cfg, step, acc_in_ref=False)


def launch_swap_ab(x, packed: list, rows_per_step: list, cfg: MgpuW4Config, step, acc_in_ref: bool,
                   sub_k: int = GROUP, scale_steps: int = 0, out_scale=None):
    """Runs `step` over the persistent swap-AB grid: x [M, K] (bf16 or e4m3) padded to the token tile, shared
    by every weight, or a list of one such x per weight (W4A8's codes per input scale); packed: one weight
    array [N_s, K/2] (or int4 [N_s, K]) per weight of a group (flipped in the kernel when given as canonical
    uint8); rows_per_step: per weight, its list of [K/sub_k, N_s] arrays (GROUP // sub_k rows per 128-K step;
    x is swizzled so step can slice it every sub_k columns). y [M, sum N_s] bf16, the weights' outputs side by
    side. With split-K partials the kernel writes f32 and one XLA fusion sums and rounds once. scale_steps > 0:
    each weight's per-step arrays are channel-major 1-byte [N_s, C] instead (C a multiple of SCALE_ROW_BYTES),
    one 16-byte TMA row per channel covering scale_steps K-steps (a block of max(scale_steps, sub-steps)
    K-steps per channel in shared memory), and step gets the pipeline step's index to find its part (split K
    ranges must start on a row). out_scale: an f32 scalar that multiplies the f32 sums before the
    one rounding (NVFP4's global scale), or None. With cfg.sub_steps S > 1 a pipeline step holds S 128-K
    sub-steps: step gets S x tiles, then S weight tiles (each array passed S times, one TMA view per
    sub-step), then the step's rows, and with scale_steps the pipeline step's index."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    xs = x if isinstance(x, list) else [x]
    m, k = xs[0].shape
    flip = packed[0].dtype != jnp.int4
    weights = [bits_as_int4(p) if flip else p for p in packed]
    n = sum(p.shape[0] for p in packed)
    wg_ch = cfg.wg_channels
    cta_ch = 2 * wg_ch
    starts = [0]                                        # first channel tile of each weight
    for p in packed:
        starts.append(starts[-1] + p.shape[0] // cta_ch)
    t, split = cfg.tile_tokens, cfg.split_k
    mp = -(-m // t) * t
    subs = cfg.sub_steps
    tiles_t, kb_split = mp // t, k // GROUP // split
    rows = GROUP // sub_k
    row_cols = SCALE_ROW_BYTES // scale_steps if scale_steps else 0   # channel-major columns per K-step
    block_steps = max(scale_steps, subs)                # K-steps per channel-major scale block
    per_weight = subs + len(rows_per_step[0])           # operands per weight: its int4 array per sub-step, rows
    xps = [jnp.pad(xx, ((0, mp - m), (0, 0))) for xx in xs]
    x_bits = jnp.dtype(xs[0].dtype).itemsize * 8
    grid = (n // cta_ch, tiles_t * split)              # tile (ci, s * tiles_t + ti): K range s, tokens ti

    # operands: x, then (w, rows) per weight; or, with one x per weight, (x_s, w, rows) per weight; x and w
    # each repeated per sub-step. Either way one pipeline's set comes first: it sizes the shared memory every
    # pipeline reuses.
    own_x = len(xps) > 1
    block = per_weight + own_x * subs

    def views(ci, j, ops):
        ti, k0 = j % tiles_t, (j // tiles_t) * kb_split
        k_range = pl.ds(k0 * GROUP, kb_split * GROUP)

        def weight_views(s):
            first = s * block + (0 if own_x else subs)    # the weight's first operand
            x_op = ops[first] if own_x else ops[0]
            w_at = first + own_x * subs
            w, step_rows_s = ops[w_at], ops[w_at + subs:w_at + per_weight]
            chan = pl.ds((ci - starts[s]) * cta_ch, cta_ch)
            if scale_steps:
                cols = pl.ds(k0 * row_cols, -(-kb_split // scale_steps) * SCALE_ROW_BYTES)
                scale_views = [r.at[chan, cols] for r in step_rows_s]
            else:
                scale_views = [r.at[pl.ds(k0 * rows, kb_split * rows), chan] for r in step_rows_s]
            return ((x_op.at[pl.ds(ti * t, t), k_range],) * subs + (w.at[chan, k_range],) * subs
                    + tuple(scale_views))

        if len(weights) == 1:
            return weight_views(0)
        return [((ci >= starts[s]) & (ci < starts[s + 1]), weight_views(s)) for s in range(len(weights))]

    row_spec = (plgpu.BlockSpec((cta_ch, block_steps * row_cols), lambda kb: (0, kb * subs // block_steps))
                if scale_steps else plgpu.BlockSpec((rows * subs, cta_ch), lambda kb: (kb, 0)))
    x_specs = [plgpu.BlockSpec((t, GROUP), lambda kb, h=h: (0, kb * subs + h),
                               transforms=_mgpu.tiled_swizzle(sub_k * x_bits // 8, x_bits)) for h in range(subs)]
    w_specs = [plgpu.BlockSpec((cta_ch, GROUP), lambda kb, h=h: (0, kb * subs + h),
                               transforms=_mgpu.tiled_swizzle(GROUP // 2, 4)) for h in range(subs)]
    kernel = functools.partial(
        _mgpu.persistent_kernel,
        in_specs=x_specs + w_specs + [row_spec] * (per_weight - subs),
        views=views, cta=(cta_ch, t), wg_offset=lambda wg: (wg * wg_ch, 0), tile=(wg_ch, t),
        epi_n=_epi_tokens(cfg), grid=grid, k_iters=kb_split // subs,
        stages=_mgpu.chain_stages(kb_split // subs, cfg.stages) if cfg.chain_tiles else cfg.stages,
        grid_tile_width=cfg.grid_tile_width, step=functools.partial(step, flip=flip), scratch={},
        acc_in_ref=acc_in_ref, transpose_out=True, pipeline_operands=subs + per_weight, chain_tiles=cfg.chain_tiles,
        out_scale=out_scale is not None, step_index=scale_steps > 0)
    per_weight_ops = [[w] * subs + list(r) for w, r in zip(weights, rows_per_step)]
    operands = ([a for xx, o in zip(xps, per_weight_ops) for a in (*[xx] * subs, *o)] if own_x
                else xps * subs + [a for o in per_weight_ops for a in o])
    if out_scale is not None:
        operands.append(jnp.reshape(out_scale, (1,)).astype(jnp.float32))
    y = _mgpu.launch(kernel, tuple(operands), (split * mp, n), jnp.float32 if split > 1 else jnp.bfloat16,
                     grid[0] * grid[1])
    if split > 1:                                       # partials [split, Mp, N], summed in f32, rounded once
        y = jnp.sum(y.reshape(split, mp, n), axis=0)
    return y[:m].astype(jnp.bfloat16)
