"""Grouped (ragged) matmul for Hopper GPUs with two consumer warpgroups per CTA tile.

`ragged_dot(lhs[M, K], rhs[G, K, N], group_sizes=[G])` computes, for each group g, the rows of
`lhs` that belong to g (groups are consecutive row ranges, in order, of sizes `group_sizes`)
times `rhs[g]`. It has the signature of JAX's
`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot` and is written in Pallas / Mosaic
GPU.

How it differs from JAX's kernel. JAX's `ragged_dot_mgpu` runs one warpgroup per CTA: the same
128 threads issue the TMA loads (through `plgpu.emit_pipeline`), the wgmma instructions and the
output stores, on a `block_m x block_n` tile. This kernel is warp specialized like JAX's dense
`hopper_matmul_mgpu`: each CTA runs three warpgroups, a memory warpgroup (few registers) that
only issues TMA loads into a ring of `max_concurrent_steps` shared-memory stages, and two
compute warpgroups that each own a `block_m x block_n` accumulator, so the CTA tile is
`block_m x (2 * block_n)`, split along N (`plgpu.emit_pipeline_warp_specialized` with
`num_compute_wgs=2`). The LHS tile in shared memory is shared by both compute warpgroups, the
RHS tile is `block_k x 2 * block_n` and each warpgroup multiplies its half.

What it keeps from `ragged_dot_mgpu`: a persistent grid (one CTA per SM) walking
`grid_m * grid_n` tiles, where `grid_m = cdiv(M, block_m) + G - 1` bounds the number of
(group, row block) pairs, a row block that straddles a group boundary being computed once per
group it holds; the weight of the tile's group is read as `rhs.at[group]`; and the output rows
of a tile that belong to its group are written with a "ladder" of TMA stores of 2^i rows (TMA
boxes have static shapes, the row count is only known at run time). The schedule arithmetic
here is our own: empty groups take no tile at all, and the epilogue stores each warpgroup's
accumulator in `epi_n`-column chunks through a small per-warpgroup staging buffer, so that
four pipeline stages of a 128 x 256 tile still fit in shared memory.

Only sm_90 (H100 / H200) runs it; `tile_schedule` (NumPy) is the same schedule for tests.

Transposed kernel (the weight gradient). `transposed_ragged_dot(lhs[M, K], rhs[M, N],
group_sizes=[G])` -> [G, K, N] computes, for each group g, lhs_g^T @ rhs_g over the group's rows,
with the signature of JAX's `transposed_ragged_dot_mgpu.transposed_ragged_dot` (its `block_m`
tiles K, `block_n` tiles N and `block_k` tiles the rows, the reduction). The output tile of a
CTA is (group, K tile, N tile): the persistent loop walks `G x (K / cta_m) x (N / cta_n)` tiles,
group-major (a group's rows stay in L2 while all its output tiles read them). Each tile reduces
over the row blocks of `block_k` rows that its group touches, `group_row_blocks`: from the
block holding the group's first row to the one holding its last. A block that straddles a group
boundary holds rows of another group; those rows must contribute zero, so on the first and the
last step of a tile each compute warpgroup loads the operand tile it owns (its half of the lhs
tile with `wg_dim='m'`, of the rhs tile with 'n') into registers, multiplies the rows outside
[start, end) by 0 and stores it back before its wgmma (`transposed_step_rows` mirrors this;
the steps between are whole blocks of the group). An empty group still takes its tiles, with
one fully masked step each, so its [K, N] output is written with zeros. Rows past M read as
zeros (TMA bounds).

What limits JAX's kernel at the expert shapes (K, N = 4096, 16384, ~1000 rows per group of 16):
each output tile reduces only ~16 steps of 64 rows, and every [K, N] output is 64M elements, so
per tile the pipeline fill and the epilogue weigh as much as a quarter of the mainloop, and the
single warpgroup issues loads, wgmma and stores in turn. Here the warp specialization is written
by hand: a memory warpgroup loads into a ring of `max_concurrent_steps` shared-memory stages that
runs on across the CTA's output tiles (`stage_schedule`), reloading a stage as soon as both
compute warpgroups have consumed it, so the next tile's first steps load during the current
tile's last steps and its epilogue (a pipeline per tile, `emit_pipeline_warp_specialized` as in
the forward, waits at each tile's end until all its stages are consumed); two compute
warpgroups share each loaded tile of the other operand (CTA tile 2 * block_m x block_n or
block_m x 2 * block_n, `wg_dim`); and the epilogue streams `epi_n`-column chunks through
`epi_slots` staging buffers per warpgroup as asynchronous TMA stores, a buffer's reuse waiting
only for the store that last read it (`epilogue_chunks`), never for the global write.

Where the time goes at 16384 x 4096 x 16384 in 16 groups (one H100, one call,
docs/benchmarks/tgmm_overlap/): the ring ran 3.497 ms against 3.501 ms for the per-tile
pipeline (3.620 against 3.711 at K, N = 16384, 4096), a wait-free epilogue (4 slots, 3 stages)
3.466 ms; with the epilogue's stores left out the per-tile pipeline ran 2.618 ms and the ring
3.034 ms. So the 2.1 GB the output writes at G=16 costs time, but not by making a compute
warpgroup wait on its stores (the wait-free epilogue gained 1%); presumably through the memory
system the stores share with the loads (L2, HBM), which was not measured.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class TileInfo:
  """Which group a row-tile index `tid` of the persistent loop works on.

  Attributes:
    group: group index (0 for a tile past the last one: then `size == 0`).
    block: row block of `lhs` / the output (rows `block * block_m ...`).
    offset: first row of the block that belongs to the group (0 <= offset < block_m).
    size: number of the block's rows that belong to the group (0 <= size <= block_m).
  """

  group: object
  block: object
  offset: object
  size: object


def group_tile(group_sizes, block_m: int, tid, *, ops=None) -> TileInfo:
  """The group, row block and row range of row-tile `tid` (unrolled over the groups).

  Tiles are numbered group by group: group g takes `cdiv(end_g, block_m) - start_g // block_m`
  consecutive tiles (none when it is empty), one per row block it touches. So there are at
  most `cdiv(M, block_m) + G - 1` tiles; an index past the last gets `size == 0`.

  Args:
    group_sizes: sequence of G scalars (Python ints, or int32 values/refs reads in a kernel).
    block_m: rows of a tile.
    tid: row-tile index (int or int32 scalar).
    ops: a namespace with `where(c, a, b)`, `maximum`, `minimum` and `div` (of nonnegative
      integers; defaults to NumPy); the kernel passes lax/jnp ones.

  Returns:
    TileInfo of the tile.
  """
  where = np.where if ops is None else ops.where
  maximum = np.maximum if ops is None else ops.maximum
  minimum = np.minimum if ops is None else ops.minimum
  div = np.floor_divide if ops is None else ops.div
  zero = tid * 0
  start = zero  # First row of the current group.
  first_tile = zero  # Tile index of the current group's first tile.
  group = block = g_start = g_end = zero
  for i, size in enumerate(group_sizes):
    end = start + size
    first_block = div(start, block_m)
    n_tiles = where(size > 0, div(end + block_m - 1, block_m) - first_block, zero)
    mine = (first_tile <= tid) & (tid < first_tile + n_tiles)
    group = where(mine, zero + i, group)
    block = where(mine, first_block + (tid - first_tile), block)
    g_start = where(mine, start, g_start)
    g_end = where(mine, end, g_end)
    first_tile = first_tile + n_tiles
    start = end
  block_start = block * block_m
  row_lo = maximum(g_start, block_start)
  row_hi = minimum(g_end, block_start + block_m)
  return TileInfo(
    group=group, block=block, offset=row_lo - block_start, size=maximum(row_hi - row_lo, zero)
  )


def num_row_tiles(m: int, g: int, block_m: int) -> int:
  """Upper bound on the row tiles of `group_tile`: cdiv(m, block_m) + g - 1."""
  return -(-m // block_m) + g - 1


def tile_schedule(group_sizes, block_m: int) -> list[tuple[int, int, int, int]]:
  """(group, block, offset, size) of every row tile with rows to write (NumPy, for tests)."""
  sizes = [int(s) for s in group_sizes]
  m = sum(sizes)
  out = []
  for tid in range(num_row_tiles(m, len(sizes), block_m)):
    info = group_tile(sizes, block_m, np.int64(tid))
    if int(info.size) > 0:
      out.append((int(info.group), int(info.block), int(info.offset), int(info.size)))
  return out


def store_ladder(size: int, block_m: int) -> list[tuple[int, int]]:
  """(row offset within the tile's rows, row count) of the TMA stores for `size` rows.

  One power of two per set bit of `size`, largest first: the kernel unrolls the bits of
  `block_m` and predicates each store on its bit (pure Python mirror, for tests).
  """
  out, off = [], 0
  bit = 1 << (block_m.bit_length() - 1)
  while bit:
    if size & bit:
      out.append((off, bit))
      off += bit
    bit >>= 1
  return out


def ragged_dot(
  lhs,
  rhs,
  *,
  group_sizes,
  transpose_rhs: bool = False,
  block_m: int = 128,
  block_n: int = 128,
  block_k: int = 64,
  max_concurrent_steps: int = 4,
  grid_block_n: int = 1,
  epi_n: int = 64,
  delay_release: int = 0,
  num_sms: int | None = None,
):
  """Grouped matmul out[rows of g] = lhs[rows of g] @ rhs[g] on Hopper, 2 compute warpgroups.

  Args:
    lhs: [M, K] bf16 (or f16).
    rhs: [G, K, N], or [G, N, K] with `transpose_rhs=True`; same dtype as `lhs`.
    group_sizes: [G] int32, summing to M (rows past the sum are left unwritten).
    transpose_rhs: whether `rhs` is stored [G, N, K].
    block_m: rows of a CTA tile (and of each warpgroup's tile); a multiple of 64.
    block_n: columns of ONE warpgroup's tile; the CTA covers `2 * block_n` columns.
    block_k: K of a pipeline stage.
    max_concurrent_steps: pipeline stages in shared memory.
    grid_block_n: width, in N tiles, of the snake order of the persistent loop (L2 reuse).
    epi_n: columns of an epilogue store chunk (divides block_n).
    delay_release: 1 keeps one wgmma in flight across pipeline steps, 0 waits each step.
    num_sms: CTAs of the persistent grid (default: the device's SM count).

  Returns:
    [M, N] in `lhs.dtype`.
  """
  import jax
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  import jax.numpy as jnp
  from jax import lax

  if lhs.dtype != rhs.dtype:
    raise NotImplementedError(f'lhs and rhs dtypes differ: {lhs.dtype} vs {rhs.dtype}')
  m, k = lhs.shape
  g, k2, n = rhs.shape
  if transpose_rhs:
    k2, n = n, k2
  if k != k2:
    raise ValueError(f'contracting dims differ: lhs K={k}, rhs K={k2}')
  if group_sizes.shape != (g,):
    raise ValueError(f'group_sizes must have shape ({g},), got {group_sizes.shape}')
  cta_n = 2 * block_n
  if k % block_k:
    raise ValueError(f'K={k} must be a multiple of block_k={block_k}')
  if n % cta_n:
    raise ValueError(f'N={n} must be a multiple of 2 * block_n = {cta_n}')
  if block_n % epi_n:
    raise ValueError(f'epi_n={epi_n} must divide block_n={block_n}')
  if block_m % 64:
    raise ValueError(f'block_m={block_m} must be a multiple of 64')
  dtype = lhs.dtype
  itemsize = jnp.dtype(dtype).itemsize
  grid_m = num_row_tiles(m, g, block_m)
  grid_n = n // cta_n
  k_iters = k // block_k
  if num_sms is None:
    from jax.extend import backend

    num_sms = getattr(backend.get_default_device(), 'core_count', None) or 132

  swizzle = plgpu.find_swizzle(block_k * itemsize * 8)
  transforms = (
    plgpu.TilingTransform((8, swizzle // itemsize)),
    plgpu.SwizzleTransform(swizzle),
  )
  jops = _jax_ops()

  def make_pipeline(body, compute_context, tile_block, n_idx):
    rhs_block = (cta_n, block_k) if transpose_rhs else (block_k, cta_n)
    rhs_index = (lambda ki: (n_idx, ki)) if transpose_rhs else (lambda ki: (ki, n_idx))
    return plgpu.emit_pipeline_warp_specialized(
      body,
      grid=(k_iters,),
      memory_registers=40,
      in_specs=[
        plgpu.BlockSpec(
          (block_m, block_k),
          lambda ki: (tile_block, ki),
          transforms=transforms,
          memory_space=plgpu.SMEM,
          delay_release=delay_release,
        ),
        plgpu.BlockSpec(
          rhs_block,
          rhs_index,
          transforms=transforms,
          memory_space=plgpu.SMEM,
          delay_release=delay_release,
        ),
      ],
      wg_axis='wg',
      num_compute_wgs=2,
      max_concurrent_steps=max_concurrent_steps,
      compute_context=compute_context,
    )

  def kernel(sizes_gmem, lhs_gmem, rhs_gmem, out_gmem):
    ignore = lambda *_, **__: None
    allocs = make_pipeline(ignore, ignore, 0, 0).get_allocations(lhs_gmem, rhs_gmem.at[0])

    @functools.partial(
      pl.run_scoped,
      pipeline_allocs=allocs,
      out_smem=plgpu.SMEM((2, block_m, epi_n), dtype),
      collective_axes='wg',
    )
    def _scope(pipeline_allocs, out_smem):
      wg = lax.axis_index('wg')
      sizes = [sizes_gmem[i] for i in range(g)]

      @plgpu.nd_loop((grid_m * grid_n,), collective_axes='sm')
      def _tile_loop(loop_info):
        (lin,) = loop_info.index
        mi, ni = plgpu.planar_snake(lin, (grid_m, grid_n), 1, grid_block_n)
        info = group_tile(sizes, block_m, mi, ops=jops)
        wg_n = pl.ds(wg * block_n, block_n)

        def mma(_, a_smem, b_smem, acc_ref):
          if transpose_rhs:
            b = plgpu.transpose_ref(b_smem.at[wg_n, :], (1, 0))
          else:
            b = b_smem.at[:, wg_n]
          plgpu.wgmma(acc_ref, a_smem, b)
          plgpu.wgmma_wait(delay_release)
          return acc_ref

        def compute_context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((block_m, block_n), jnp.float32))
          def _acc(acc_ref):
            eval_pipeline(acc_ref)
            acc = acc_ref[...].astype(dtype)
            row0 = info.block * block_m
            col0 = ni * cta_n + wg * block_n
            stage = out_smem.at[wg]
            for c in range(block_n // epi_n):
              # The previous chunk's TMA store must have read the staging buffer.
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              stage[...] = acc[:, c * epi_n : (c + 1) * epi_n]
              plgpu.commit_smem()
              off = info.offset
              bit = 1 << (block_m.bit_length() - 1)
              while bit:

                @pl.when((info.size & bit) != 0)
                def _store(off=off, bit=bit, c=c):
                  plgpu.copy_smem_to_gmem(
                    stage.at[pl.ds(off, bit)],
                    out_gmem.at[pl.ds(row0 + off, bit), pl.ds(col0 + c * epi_n, epi_n)],
                  )

                off = off + (info.size & bit)
                bit >>= 1

        make_pipeline(mma, compute_context, info.block, ni)(
          lhs_gmem, rhs_gmem.at[info.group], allocations=pipeline_allocs
        )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = plgpu.kernel(
    kernel,
    out_type=jax.ShapeDtypeStruct((m, n), dtype),
    grid=(num_sms,),
    grid_names=('sm',),
    num_threads=3,
    thread_name='wg',
    compiler_params=plgpu.CompilerParams(
      lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
    ),
  )
  return call(group_sizes.astype(jnp.int32), lhs, rhs)


def group_row_blocks(start, end, block_k: int, num_blocks: int, *, ops=None):
  """(first row block, pipeline steps) of the transposed kernel for a group of rows [start, end).

  The steps run over the blocks of `block_k` rows from the one holding `start` to the one
  holding `end - 1`. An empty group takes one step, all of its rows masked, on a block clamped
  into [0, num_blocks) (so that its load stays in bounds): its output tile is written as zeros.

  Args:
    start: the group's first row (int or int32 scalar).
    end: one past its last row.
    block_k: rows of a pipeline step.
    num_blocks: cdiv(M, block_k).
    ops: a namespace with `maximum`, `minimum` and `div` (defaults to NumPy), as `group_tile`.

  Returns:
    (first block, number of steps >= 1).
  """
  maximum = np.maximum if ops is None else ops.maximum
  minimum = np.minimum if ops is None else ops.minimum
  div = np.floor_divide if ops is None else ops.div
  first = minimum(div(start, block_k), num_blocks - 1)
  last = div(end + block_k - 1, block_k)
  return first, maximum(last - first, 1)


def transposed_step_rows(group_sizes, block_k: int) -> list[list[tuple[int, int, int]]]:
  """Per group, (block, lo, hi) of each step of the transposed kernel: the step's block keeps
  its rows lo <= i < hi (block-local; lo >= hi keeps none). The kernel masks only the first and
  the last step of a tile, to the group's rows [start, end); the steps between keep the whole
  block (NumPy mirror of the kernel, for tests)."""
  sizes = [int(s) for s in group_sizes]
  m = sum(sizes)
  num_blocks = -(-m // block_k)
  out, start = [], 0
  for size in sizes:
    end = start + size
    first, steps = (int(x) for x in group_row_blocks(start, end, block_k, num_blocks))
    rows = []
    for step in range(steps):
      block = first + step
      lo, hi = 0, block_k
      if step in (0, steps - 1):
        lo, hi = max(lo, start - block * block_k), min(hi, end - block * block_k)
      rows.append((block, lo, hi))
    out.append(rows)
    start = end
  return out


def _jax_ops():
  """`group_tile`'s ops namespace on int32 scalars inside a kernel."""
  import jax.numpy as jnp
  from jax import lax

  ops = type('ops', (), {})
  ops.where = staticmethod(lambda c, a, b: lax.select(c, a, b))
  ops.maximum = staticmethod(jnp.maximum)
  ops.minimum = staticmethod(jnp.minimum)
  ops.div = staticmethod(lambda a, b: lax.div(a, jnp.int32(b)))
  return ops


def stage_schedule(tile_steps, stages: int) -> list[tuple[int, int, int, int]]:
  """(tile, step in the tile, stage slot, earlier step whose slot it reuses or -1) of every
  pipeline step of one CTA of the transposed kernel, whose shared-memory ring runs on across
  output tiles (pure Python mirror of the kernel's `step = first step of the tile + ki`,
  `slot = step % stages`; the memory warpgroup waits for the reused step's consumption)."""
  out, step = [], 0
  for tile, steps in enumerate(tile_steps):
    for ki in range(int(steps)):
      out.append((tile, ki, step % stages, step - stages if step >= stages else -1))
      step += 1
  return out


def epilogue_chunks(block_n: int, epi_n: int, slots: int) -> list[tuple[int, int]]:
  """(staging slot, store groups left pending by the wait before it) of each `epi_n`-column
  chunk of a warpgroup's epilogue: chunk c goes through slot c % slots after waiting until at
  most slots - 1 stores are still reading shared memory, i.e. until the store that last read
  this slot (chunk c - slots, of this tile or, since the chunk count is a multiple of `slots`,
  of the previous one) is done reading (pure Python mirror, for tests)."""
  chunks = block_n // epi_n
  if block_n % epi_n or slots < 1 or chunks % slots:
    raise ValueError(
      f'block_n={block_n}, epi_n={epi_n}: {chunks} chunks, not a multiple of {slots}'
    )
  return [(c % slots, slots - 1) for c in range(chunks)]


def transposed_ragged_dot(
  lhs,
  rhs,
  *,
  group_sizes,
  block_m: int = 64,
  block_n: int = 256,
  block_k: int = 64,
  max_concurrent_steps: int = 4,
  grid_block_n: int = 1,
  wg_dim: str = 'm',
  epi_n: int = 64,
  epi_slots: int = 2,
  num_sms: int | None = None,
):
  """Per-group lhs_g^T @ rhs_g on Hopper, two compute warpgroups (the weight gradient).

  Args:
    lhs: [M, K] bf16 (or f16), rows sorted by group; M a multiple of 8.
    rhs: [M, N], same dtype and row order.
    group_sizes: [G] int32 row counts (rows past their sum are ignored).
    block_m: K rows of ONE warpgroup's output tile.
    block_n: N columns of ONE warpgroup's output tile.
    block_k: rows of `lhs` / `rhs` per pipeline step (the reduction).
    max_concurrent_steps: pipeline stages in shared memory.
    grid_block_n: width, in N tiles, of the snake order of a group's tiles (L2 reuse).
    wg_dim: 'm': the two warpgroups split the CTA's K rows (CTA tile 2*block_m x block_n,
      sharing the rhs tile); 'n': they split its N columns (block_m x 2*block_n, sharing lhs).
    epi_n: columns of an epilogue store chunk (divides block_n).
    epi_slots: staging buffers per warpgroup for the epilogue's chunks (divides the chunk
      count block_n / epi_n; with as many slots as chunks the epilogue never waits).
    num_sms: CTAs of the persistent grid (default: the device's SM count).

  Returns:
    [G, K, N] in `lhs.dtype`; zeros for an empty group.

  Unlike `ragged_dot` it has no `delay_release`: each step waits for its wgmma before it
  releases its stage. With one wgmma kept in flight, the per-tile pipeline of an earlier
  revision passed the small checks but failed to launch ("unspecified launch failure") at
  16384 x 4096 x 16384, G=16, on one H100: that pipeline's end waits for all but
  `delay_release` released stages, so the next tile's first loads could land in a stage a
  wgmma still read. In the ring it would take releasing step s's stage only after step s+1's
  `wgmma_wait(1)`, and a tile's last stage after its `wgmma_wait(0)`.
  """
  import jax
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  import jax.numpy as jnp
  from jax import lax

  if lhs.dtype != rhs.dtype:
    raise NotImplementedError(f'lhs and rhs dtypes differ: {lhs.dtype} vs {rhs.dtype}')
  m, k = lhs.shape
  m2, n = rhs.shape
  if m != m2:
    raise ValueError(f'row counts differ: lhs {m}, rhs {m2}')
  (g,) = group_sizes.shape
  if m % 8:
    raise ValueError(f'M={m} must be a multiple of 8 (TMA row tiling; gmm pads rows to it)')
  if wg_dim not in ('m', 'n'):
    raise ValueError(f"wg_dim must be 'm' or 'n', got {wg_dim!r}")
  cta_m = block_m * (2 if wg_dim == 'm' else 1)
  cta_n = block_n * (2 if wg_dim == 'n' else 1)
  if k % cta_m:
    raise ValueError(f'K={k} must be a multiple of the CTA tile {cta_m}')
  if n % cta_n:
    raise ValueError(f'N={n} must be a multiple of the CTA tile {cta_n}')
  if block_m % 64 or block_n % 64 or block_k % 64:
    raise ValueError(f'block_m, block_n, block_k = {block_m, block_n, block_k}: multiples of 64')
  if block_n % epi_n:
    raise ValueError(f'epi_n={epi_n} must divide block_n={block_n}')
  chunks = epilogue_chunks(block_n, epi_n, epi_slots)
  dtype = lhs.dtype
  itemsize = jnp.dtype(dtype).itemsize
  grid_m, grid_n = k // cta_m, n // cta_n
  num_blocks = -(-m // block_k)
  stages = max_concurrent_steps
  if num_sms is None:
    from jax.extend import backend

    num_sms = getattr(backend.get_default_device(), 'core_count', None) or 132

  # Both operand tiles have 64-element multiples as their minor dimension.
  swizzle = plgpu.find_swizzle(64 * itemsize * 8)
  transforms = (
    plgpu.TilingTransform((8, swizzle // itemsize)),
    plgpu.SwizzleTransform(swizzle),
  )
  out_swizzle = plgpu.find_swizzle(epi_n * itemsize * 8)
  out_transforms = (
    plgpu.TilingTransform((8, out_swizzle // itemsize)),
    plgpu.SwizzleTransform(out_swizzle),
  )
  ops = _jax_ops()

  def tile_of(loop_info, starts_gmem, ends_gmem):
    gi, lin = loop_info.index
    mi, ni = plgpu.planar_snake(lin, (grid_m, grid_n), 1, grid_block_n)
    start, end = starts_gmem[gi], ends_gmem[gi]
    first_block, steps = group_row_blocks(start, end, block_k, num_blocks, ops=ops)
    return gi, mi, ni, start, end, first_block, steps

  def mask_and_mma(wg, ki, a_smem, b_smem, acc_ref, start, end, first_block, steps):
    """One step: mask the rows outside [start, end) on a tile's first and last step (each
    warpgroup its own half of the operand it does not share), then the wgmma, awaited."""
    row0 = (first_block + ki) * block_k

    @pl.when((ki == 0) | (ki == steps - 1))
    def _mask():
      for w in range(2):

        @pl.when(wg == w)
        def _mask_wg(w=w):
          if wg_dim == 'm':
            ref = a_smem.at[:, w * block_m : (w + 1) * block_m]
          else:
            ref = b_smem.at[:, w * block_n : (w + 1) * block_n]
          x = ref[...]
          rows = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, x.shape, 0), plgpu.Layout.WGMMA)
          keep = (rows >= start - row0).astype(x.dtype) * (rows < end - row0).astype(x.dtype)
          ref[...] = x * keep
          plgpu.commit_smem()

    if wg_dim == 'm':
      a = a_smem.at[:, pl.ds(wg * block_m, block_m)]
      b = b_smem
    else:
      a = a_smem
      b = b_smem.at[:, pl.ds(wg * block_n, block_n)]
    plgpu.wgmma(acc_ref, plgpu.transpose_ref(a, (1, 0)), b)
    plgpu.wgmma_wait(0)

  def epilogue(wg, acc_ref, out_smem, out_gmem, gi, mi, ni):
    """The warpgroup's tile in `epi_n`-column chunks through its `epi_slots` staging buffers;
    only a buffer's reuse waits (for the store that last read it), never the global write."""
    acc = acc_ref[...].astype(dtype)
    if wg_dim == 'm':
      row0, col0 = mi * cta_m + wg * block_m, ni * cta_n
    else:
      row0, col0 = mi * cta_m, ni * cta_n + wg * block_n
    for c, (slot, pending) in enumerate(chunks):
      plgpu.wait_smem_to_gmem(pending, wait_read_only=True)
      out_smem[wg, slot] = acc[:, c * epi_n : (c + 1) * epi_n]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
        out_smem.at[wg, slot],
        out_gmem.at[gi, pl.ds(row0, block_m), pl.ds(col0 + c * epi_n, epi_n)],
      )

  def flat_kernel(starts_gmem, ends_gmem, lhs_gmem, rhs_gmem, out_gmem):
    """Warp specialized by hand: one ring of `stages` stages runs on across the CTA's output
    tiles (`stage_schedule`), so the memory warpgroup loads the next tile's first steps as soon
    as the current tile's last ones free their stages, not after the epilogue."""

    @functools.partial(
      pl.run_scoped,
      lhs_smem=plgpu.SMEM((stages, block_k, cta_m), dtype, transforms=transforms),
      rhs_smem=plgpu.SMEM((stages, block_k, cta_n), dtype, transforms=transforms),
      out_smem=plgpu.SMEM((2, epi_slots, block_m, epi_n), dtype, transforms=out_transforms),
      loaded=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      consumed=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      collective_axes='wg',
    )
    def _scope(lhs_smem, rhs_smem, out_smem, loaded, consumed):
      wg = lax.axis_index('wg')
      tiles = functools.partial(
        plgpu.nd_loop, (g, grid_m * grid_n), collective_axes='sm', init_carry=jnp.int32(0)
      )

      def memory():
        plgpu.set_max_registers(40, action='decrease')

        def load_tile(loop_info, carry):
          gi, mi, ni, start, end, first_block, steps = tile_of(loop_info, starts_gmem, ends_gmem)

          @pl.loop(0, steps)
          def _step(ki):
            step = carry + ki
            slot = lax.rem(step, stages)

            # The stage's last user, step - stages, must have been consumed by both
            # compute warpgroups (its wgmma awaited).
            @pl.when(step >= stages)
            def _reuse():
              plgpu.barrier_wait(consumed.at[slot])

            rows = pl.ds((first_block + ki) * block_k, block_k)
            plgpu.copy_gmem_to_smem(
              lhs_gmem.at[rows, pl.ds(mi * cta_m, cta_m)], lhs_smem.at[slot], loaded.at[slot]
            )
            plgpu.copy_gmem_to_smem(
              rhs_gmem.at[rows, pl.ds(ni * cta_n, cta_n)], rhs_smem.at[slot], loaded.at[slot]
            )

          return carry + steps

        total = tiles()(load_tile)
        # Observe the consumption of the last `stages` steps too, so that every phase of
        # every `consumed` barrier is awaited (as at a pipeline's end) before the exit.
        for j in range(stages):

          @pl.when(total - stages + j >= 0)
          def _drain(j=j):
            plgpu.barrier_wait(consumed.at[lax.rem(total - stages + j, stages)])

      def compute():
        plgpu.set_max_registers(232, action='increase')

        @tiles()
        def _tile(loop_info, carry):
          gi, mi, ni, start, end, first_block, steps = tile_of(loop_info, starts_gmem, ends_gmem)

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((block_m, block_n), jnp.float32))
          def _acc(acc_ref):
            @pl.loop(0, steps)
            def _step(ki):
              slot = lax.rem(carry + ki, stages)
              plgpu.barrier_wait(loaded.at[slot])
              mask_and_mma(
                wg,
                ki,
                lhs_smem.at[slot],
                rhs_smem.at[slot],
                acc_ref,
                start,
                end,
                first_block,
                steps,
              )
              plgpu.barrier_arrive(consumed.at[slot])

            epilogue(wg, acc_ref, out_smem, out_gmem, gi, mi, ni)

          return carry + steps

        # The staging buffers must outlive the stores reading them.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      lax.cond(wg < 2, compute, memory)

  call = plgpu.kernel(
    flat_kernel,
    out_type=jax.ShapeDtypeStruct((g, k, n), dtype),
    grid=(num_sms,),
    grid_names=('sm',),
    num_threads=3,
    thread_name='wg',
    compiler_params=plgpu.CompilerParams(
      lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
    ),
  )
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  return call(ends - sizes, ends, lhs, rhs)
