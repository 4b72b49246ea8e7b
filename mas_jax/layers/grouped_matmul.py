"""Grouped (ragged) matmul for dropless experts: rows sorted by group, one weight per group.

`gmm(lhs[M, K], rhs[G, K, N], group_sizes[G])` multiplies rows `offset_g .. offset_g + size_g`
of lhs by rhs[g]; the sizes sum to at most M (rows past the sum are not computed: what the
kernels leave in their output rows is unspecified). One group is a dense matmul of all M rows.
Two implementations:

  'xla'         `jax.lax.ragged_dot` (any backend; XLA's own autodiff).
  'mosaic_gpu'  Hopper Pallas/Mosaic-GPU kernels wrapped in a custom VJP: our two-warpgroup
                grouped matmul (`mas_jax/layers/gmm_hopper.py`, 1.3-2.1x JAX's
                single-warpgroup `ragged_dot_mgpu`, docs/benchmarks/gmm_2wg.md) for the
                forward and the data gradient, and our two-warpgroup transposed kernel
                (`gmm_hopper.transposed_ragged_dot`, 1.14-1.34x JAX's
                `transposed_ragged_dot_mgpu` at 8192 and 16384 rows in 4-16 groups,
                docs/benchmarks/tgmm_2wg.md) for the weight gradient:
                  d lhs = gmm(d out, rhs^T)        (the same kernel, transposed rhs)
                  d rhs = per-group lhs_g^T @ d out_g   (the transposed kernel)
                Needs an sm_90 GPU; the kernels' signatures are pinned by
                `tests/test_grouped_matmul.py` on CPU (through `kernels=`, which takes any
                functions with the kernels' signatures).

Unlike the capacity-padded batched einsum, no row is padding: each output tile costs only the
rows of its group (a tile that straddles two groups is computed twice, once per group).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ('xla', 'mosaic_gpu')
ROW_ALIGN = 8  # the Mosaic-GPU kernels need a row count that is a multiple of this


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes of one Mosaic-GPU kernel call (see the kernels' own docs). For the forward
  kernel (`gmm_hopper.ragged_dot`) `block_n` is one warpgroup's width, the CTA covers twice it,
  and `delay_release` = 1 keeps one wgmma in flight across pipeline steps. For the transposed
  one (`gmm_hopper.transposed_ragged_dot`) block_m x block_n is one warpgroup's tile of the
  [K, N] output and `wg_dim` ('m' or 'n') the dimension along which the CTA holds two of them.
  Fields left at 0 / '' are not passed (JAX's kernels do not take them)."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 1
  delay_release: int = 0
  wg_dim: str = ''

  def kwargs(self) -> dict:
    out = dataclasses.asdict(self)
    if not self.delay_release:  # only the forward kernel takes it
      del out['delay_release']
    if not self.wg_dim:  # only the transposed two-warpgroup kernel takes it
      del out['wg_dim']
    return out


class Kernels(NamedTuple):
  """`forward(lhs, rhs, *, group_sizes, transpose_rhs, **tiling)` -> [M, N] and
  `transposed(lhs[M, K], rhs[M, N], *, group_sizes, **tiling)` -> [G, K, N] (per group
  lhs_g^T @ rhs_g), with the signatures of JAX's Mosaic-GPU ops. `two_warpgroups`: whether
  both are the two-warpgroup kernels of `gmm_hopper` (the forward's CTA spans 2 * block_n
  columns, the transposed one's two warpgroup tiles along `wg_dim`), which `check_shapes` and
  `tilings_for` follow."""

  forward: Callable
  transposed: Callable
  two_warpgroups: bool = True


# From this many rows a call runs the two-warpgroup kernels (forward, data and weight gradient),
# below it JAX's single-warpgroup ones. Expert FFN at the seed's shapes on one H100, forward +
# backward, 2 local experts (2086 rows), against a dense FFN of the same FLOPs in the same call
# (`bench/gpu_bench.py --skip attention --local_experts=1,2
# --ffn_impls=einsum,mosaic_gpu,mosaic_2wg,dense`, docs/benchmarks/session11/call2/): the
# two-warpgroup pair 3.115 ms (104% of dense), JAX's pair 3.536 ms (92%); forward alone 1.179
# against 1.192 ms. From 4139 rows the forward alone ran at 82-92% of the matmul ceiling against
# 63-71% (docs/benchmarks/two_warpgroup_call/). Below 2048 rows nothing was timed with both.
# Decode's few rows per expert keep the kernel and tilings its decode benchmark measured.
TWO_WARPGROUP_MIN_ROWS = 2048


def one_warpgroup_kernels() -> Kernels:
  """JAX's Hopper kernels (imported on first use: the modules need a GPU-enabled jaxlib)."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

  return Kernels(
    ragged_dot_mgpu.ragged_dot, transposed_ragged_dot_mgpu.transposed_ragged_dot, False
  )


def two_warpgroup_kernels() -> Kernels:
  """Our two-warpgroup forward (`gmm_hopper.ragged_dot`) and transposed
  (`gmm_hopper.transposed_ragged_dot`) kernels."""
  from mas_jax.layers import gmm_hopper

  return Kernels(gmm_hopper.ragged_dot, gmm_hopper.transposed_ragged_dot)


def two_warpgroup(rows: int | None) -> bool:
  """Whether a call of `rows` rows (None: unknown, a training shape) runs the two-warpgroup
  kernels."""
  return rows is None or rows >= TWO_WARPGROUP_MIN_ROWS


def mosaic_gpu_kernels(rows: int | None = None) -> Kernels:
  """The 'mosaic_gpu' kernels for a call of `rows` rows (`two_warpgroup`)."""
  return two_warpgroup_kernels() if two_warpgroup(rows) else one_warpgroup_kernels()


def check_shapes(
  m: int,
  k: int,
  n: int,
  fwd: Tiling,
  bwd_data: Tiling,
  bwd_weight: Tiling,
  two_warpgroups: bool = True,
):
  """Raises ValueError naming the numbers when the kernels cannot tile lhs[m, k] @ rhs[g, k, n]
  (`two_warpgroups`: with the two-warpgroup kernels: the forward's CTA spans 2 * block_n, the
  transposed one's 2 * block_m, or 2 * block_n with wg_dim='n')."""
  problems = []
  cta = 2 if two_warpgroups else 1
  if k % fwd.block_k:
    problems.append(f'k={k} is not a multiple of the forward block_k={fwd.block_k}')
  width = f'{cta}*block_n*grid_block_n' if cta > 1 else 'block_n*grid_block_n'
  if n % (cta * fwd.block_n * fwd.grid_block_n):
    problems.append(f'n={n} is not a multiple of {width}={cta * fwd.block_n * fwd.grid_block_n}')
  if n % bwd_data.block_k:
    problems.append(f'n={n} is not a multiple of the backward block_k={bwd_data.block_k}')
  if k % (cta * bwd_data.block_n * bwd_data.grid_block_n):
    problems.append(
      f'k={k} is not a multiple of the backward {width}='
      f'{cta * bwd_data.block_n * bwd_data.grid_block_n}'
    )
  wm = 2 if two_warpgroups and bwd_weight.wg_dim != 'n' else 1
  wn = 2 if two_warpgroups and bwd_weight.wg_dim == 'n' else 1
  if k % (wm * bwd_weight.block_m) or n % (wn * bwd_weight.block_n):
    problems.append(
      f'weight gradient [{k}, {n}] is not a multiple of its tiles '
      f'[{wm * bwd_weight.block_m}, {wn * bwd_weight.block_n}]'
    )
  if problems:
    raise ValueError(
      f'mosaic_gpu grouped matmul of [{m}, {k}] x [{k}, {n}]: ' + '; '.join(problems)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _mosaic_gmm(lhs, rhs, group_sizes, kernels: Kernels, tilings: tuple[Tiling, Tiling, Tiling]):
  fwd, _, _ = tilings
  return kernels.forward(lhs, rhs, group_sizes=group_sizes, transpose_rhs=False, **fwd.kwargs())


def _mosaic_gmm_fwd(lhs, rhs, group_sizes, kernels, tilings):
  return _mosaic_gmm(lhs, rhs, group_sizes, kernels, tilings), (lhs, rhs, group_sizes)


def _mosaic_gmm_bwd(kernels, tilings, res, d_out):
  lhs, rhs, group_sizes = res
  _, bwd_data, bwd_weight = tilings
  d_out = d_out.astype(lhs.dtype)
  d_lhs = kernels.forward(
    d_out, rhs, group_sizes=group_sizes, transpose_rhs=True, **bwd_data.kwargs()
  )
  d_rhs = kernels.transposed(lhs, d_out, group_sizes=group_sizes, **bwd_weight.kwargs())
  return d_lhs, d_rhs.astype(rhs.dtype), None


_mosaic_gmm.defvjp(_mosaic_gmm_fwd, _mosaic_gmm_bwd)

# Untuned shapes: CTA tiles of 128 columns (warpgroup tiles of 64 columns; the weight
# gradient's two 64 x 128 warpgroup tiles), so that any width that is a multiple of 128 fits.
DEFAULT_TILINGS = (Tiling(block_n=64), Tiling(block_n=64), Tiling(64, 128, wg_dim='m'))
# (forward, backward data, backward weight) tilings for [rows, 4096] x [4096, 16384] (widening,
# w_in) and [rows, 16384] x [16384, 4096] (narrowing, w_out) at the seed's expert shapes. The
# two-warpgroup kernel's (forward; backward data, which contracts the other way) were the
# fastest of bench/gmm_2wg.py's sweep at 8192 rows and 16 groups on one H100
# (docs/benchmarks/gmm_2wg.md); the weight gradient's, of the two-warpgroup transposed kernel
# (CTA tile 128 x 256: two warpgroups of 64 x 256 along K), were the fastest of
# `bench/gmm_2wg.py --kernel transposed`'s sweep at 16384 rows and 16 groups on one H100
# (docs/benchmarks/tgmm_2wg.md: 3.56 ms widening, 3.69 ms narrowing, against 4.29 and 4.34 ms
# for JAX's transposed kernel with its best swept tiling).
_WIDE = Tiling(128, 128, 64, max_concurrent_steps=3, grid_block_n=8)
_NARROW = Tiling(128, 128, 64, max_concurrent_steps=4, grid_block_n=4, delay_release=1)
WIDENING_TILINGS = (_WIDE, _NARROW, Tiling(64, 256, 64, 4, grid_block_n=1, wg_dim='m'))
NARROWING_TILINGS = (_NARROW, _WIDE, Tiling(64, 256, 64, 4, grid_block_n=8, wg_dim='m'))
# Below TWO_WARPGROUP_MIN_ROWS, JAX's single-warpgroup kernels (the transposed one too) with
# the tilings of bench/grouped_matmul.py's sweep
# (docs/benchmarks/nvidia_h100_80gb_hbm3_grouped_matmul.md), which decode's benchmark measured.
ONE_WARPGROUP_DEFAULT = (Tiling(), Tiling(), Tiling())
ONE_WARPGROUP_WIDENING = (Tiling(128, 128), Tiling(128, 128), Tiling(64, 256))
ONE_WARPGROUP_NARROWING = (
  Tiling(64, 256),
  Tiling(128, 128, grid_block_n=8),
  Tiling(128, 128, grid_block_n=8),
)


def tilings_for(k: int, n: int, rows: int | None = None) -> tuple[Tiling, Tiling, Tiling]:
  """The measured tilings for lhs[rows, k] x rhs[g, k, n] (rows None: a training shape, see
  `two_warpgroup`) where they tile it, else the defaults."""
  two = two_warpgroup(rows)
  if two:
    tuned, default = (WIDENING_TILINGS if n >= k else NARROWING_TILINGS), DEFAULT_TILINGS
  else:
    tuned = ONE_WARPGROUP_WIDENING if n >= k else ONE_WARPGROUP_NARROWING
    default = ONE_WARPGROUP_DEFAULT
  try:
    check_shapes(0, k, n, *tuned, two_warpgroups=two)
  except ValueError:
    return default
  return tuned


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  impl: str = 'xla',
  *,
  tilings: tuple[Tiling, Tiling, Tiling] | None = None,
  kernels: Kernels | None = None,
) -> jax.Array:
  """Grouped matmul lhs[M, K] x rhs[G, K, N] -> [M, N] in lhs.dtype (float32 accumulation).

  Args:
    lhs: rows sorted by group.
    rhs: one [K, N] weight per group (cast to lhs.dtype).
    group_sizes: [G] int32 row counts, summing to at most M (see the module docstring).
    impl: 'xla' or 'mosaic_gpu'.
    tilings: (forward, backward data, backward weight) tiles for 'mosaic_gpu' (default:
      `tilings_for` the shapes and row count).
    kernels: the 'mosaic_gpu' kernel functions (default: `mosaic_gpu_kernels` of the row count);
      their `two_warpgroups` decides the tiling rules.
  """
  rhs = rhs.astype(lhs.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  if impl not in IMPLS:
    raise ValueError(f'grouped matmul impl={impl!r} is not one of {IMPLS}')
  if rhs.shape[0] == 1:
    # One group is a dense matmul (any rows past its size, zeros where moe.py leaves them, are
    # multiplied too).
    return jnp.dot(lhs, rhs[0], preferred_element_type=lhs.dtype)
  if impl == 'xla':
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)
  (m, k), n = lhs.shape, rhs.shape[-1]
  kernels = kernels or mosaic_gpu_kernels(m)
  two = kernels.two_warpgroups
  tilings = tilings or tilings_for(k, n, None if two else m)
  check_shapes(m, k, n, *tilings, two_warpgroups=two)
  # The kernels tile rows in multiples of 8: zero rows appended to the last group change
  # nothing (zero outputs, zero weight-gradient terms) and are sliced off.
  pad = -m % ROW_ALIGN
  if pad:
    lhs = jnp.pad(lhs, ((0, pad), (0, 0)))
    group_sizes = group_sizes.at[-1].add(pad)
  out = _mosaic_gmm(lhs, rhs, group_sizes, kernels, tuple(tilings))
  return out[:m] if pad else out
