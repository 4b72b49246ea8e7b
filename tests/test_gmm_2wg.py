"""bench/gmm_2wg.py runs end to end on CPU (--smoke), and the Hopper kernel's tile schedule
(`mas_jax/layers/gmm_hopper.py`) writes every row of every group exactly once."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mas_jax.layers import gmm_hopper

sys.path.insert(0, 'bench')

import gmm_2wg  # noqa: E402


@pytest.mark.timeout(120)
def test_gmm_2wg_smoke(tmp_path):
  gmm_2wg.main(['--smoke', '--out', str(tmp_path)])
  result = json.loads((tmp_path / 'gmm_2wg.json').read_text())
  assert result['command'].endswith(f'--smoke --out {tmp_path}')
  assert len(result['table']) == 4 and result['sweep']
  for row in result['table']:
    for tag in ('new_n', 'new_t', 'mgpu_n', 'mgpu_t'):
      assert row[f'{tag}_max_rel'] < 1e-2 and row[f'{tag}_tflops'] > 0
    assert row['dense_tflops'] > 0
  assert any(0 in row['group_sizes'] for row in result['table'])  # An empty group.
  assert result['best_tiling']
  md = (tmp_path / 'gmm_2wg.md').read_text()
  assert md.startswith('# ') and result['command'] in md
  (tmp_path / 'gmm_2wg.md').unlink()
  gmm_2wg.main(['--render', str(tmp_path / 'gmm_2wg.json')])
  assert (tmp_path / 'gmm_2wg.md').read_text() == md


def _random_sizes(rng, g, block_m):
  sizes = rng.integers(0, 3 * block_m, g)
  if g > 1 and rng.random() < 0.5:
    sizes[rng.integers(g)] = 0
  if rng.random() < 0.3:
    sizes = (sizes // block_m) * block_m  # Boundaries on block edges.
  return sizes


@pytest.mark.parametrize('block_m', [8, 64, 128])
def test_tile_schedule_covers_each_row_once(block_m):
  rng = np.random.default_rng(block_m)
  for _ in range(100):
    g = int(rng.integers(1, 9))
    sizes = _random_sizes(rng, g, block_m)
    m = int(sizes.sum())
    if m == 0:
      continue
    owner = np.repeat(np.arange(g), sizes)
    written = np.zeros(m, int)
    tiles = gmm_hopper.tile_schedule(sizes, block_m)
    assert len(tiles) <= gmm_hopper.num_row_tiles(m, g, block_m)
    for group, block, offset, size in tiles:
      assert 0 < size <= block_m and 0 <= offset and offset + size <= block_m
      rows = np.arange(block * block_m + offset, block * block_m + offset + size)
      assert (owner[rows] == group).all()
      written[rows] += 1
      ladder = gmm_hopper.store_ladder(size, block_m)
      assert sum(count for _, count in ladder) == size
      assert all(count & (count - 1) == 0 for _, count in ladder)  # Powers of two.
      assert [off for off, _ in ladder] == list(np.cumsum([0] + [c for _, c in ladder])[:-1])
    assert (written == 1).all()


def test_group_tile_in_jax_matches_numpy():
  """The kernel evaluates group_tile with lax ops on int32 scalars; same answers as NumPy."""
  block_m = 128
  sizes = np.array([300, 0, 128, 5, 0, 700], np.int32)
  m, g = int(sizes.sum()), len(sizes)
  ops = type('ops', (), {})
  ops.where = staticmethod(lambda c, a, b: lax.select(c, a, b))
  ops.maximum = staticmethod(jnp.maximum)
  ops.minimum = staticmethod(jnp.minimum)
  ops.div = staticmethod(lambda a, b: lax.div(a, jnp.int32(b)))

  @jax.jit
  def info(sizes, tid):
    t = gmm_hopper.group_tile([sizes[i] for i in range(g)], block_m, tid, ops=ops)
    return t.group, t.block, t.offset, t.size

  for tid in range(gmm_hopper.num_row_tiles(m, g, block_m)):
    want = gmm_hopper.group_tile(list(sizes), block_m, np.int64(tid))
    got = info(jnp.asarray(sizes), jnp.int32(tid))
    assert [int(x) for x in got] == [
      int(want.group),
      int(want.block),
      int(want.offset),
      int(want.size),
    ]


def test_group_routing_sizes():
  sizes = gmm_2wg.routed_group_sizes(8192, 16, seed=0, empty=True)
  assert sizes.sum() == 8192 and (sizes == 0).sum() == 1 and len(set(sizes.tolist())) > 2
  assert gmm_2wg.routed_group_sizes(8192, 1, seed=0, empty=False).tolist() == [8192]


def test_masked_reference_matches_ragged_dot():
  shape = dict(m=96, k=32, n=64, g=4, group_sizes=[40, 0, 50, 6])
  lhs, rhs, _ = gmm_2wg.make_inputs(shape, seed=0)
  want, name = gmm_2wg.reference(lhs, rhs, shape['group_sizes'])
  got, name2 = gmm_2wg.reference(lhs, rhs, shape['group_sizes'], max_bytes=0)
  assert (name, name2) == ('lax.ragged_dot', 'per-group dense dot, masked')
  assert gmm_2wg.rel_errors(got, want)['max_rel'] < 1e-5


@pytest.mark.timeout(300)
def test_gmm_2wg_transposed_smoke(tmp_path):
  gmm_2wg.main(['--smoke', '--kernel', 'transposed', '--out', str(tmp_path)])
  result = json.loads((tmp_path / 'tgmm_2wg.json').read_text())
  assert result['kernel'] == 'transposed' and result['command'].endswith(f'--out {tmp_path}')
  assert len(result['table']) == 4 and result['sweep'] and result['checks']
  for row in result['table']:
    for tag in ('new', 'jax'):
      assert row[f'{tag}_max_rel'] < 1e-2 and row[f'{tag}_tflops'] > 0
    assert row['dense_tflops'] > 0
  for check in result['checks']:
    assert check['max_rel'] < 1e-2 and check['empty_max'] == 0
  assert any(0 in row['group_sizes'] for row in result['table'])  # An empty group.
  md = (tmp_path / 'tgmm_2wg.md').read_text()
  assert md.startswith('# ') and result['command'] in md
  (tmp_path / 'tgmm_2wg.md').unlink()
  gmm_2wg.main(['--render', str(tmp_path / 'tgmm_2wg.json')])
  assert (tmp_path / 'tgmm_2wg.md').read_text() == md


@pytest.mark.parametrize('block_k', [8, 64, 128])
def test_transposed_steps_keep_each_row_once(block_k):
  """Masking only the first and last step of a tile keeps exactly the group's rows: every row
  of every group once, none past M, and an empty group one step that keeps nothing."""
  rng = np.random.default_rng(block_k)
  for _ in range(100):
    g = int(rng.integers(1, 9))
    sizes = _random_sizes(rng, g, block_k)
    if rng.random() < 0.3:
      sizes = sizes + rng.integers(0, 2, g)  # Odd sizes, off every block edge.
    m = int(sizes.sum())
    if m == 0:
      continue
    num_blocks = -(-m // block_k)
    owner = np.repeat(np.arange(g), sizes)
    kept = np.zeros(m, int)
    steps = gmm_hopper.transposed_step_rows(sizes, block_k)
    assert len(steps) == g
    for group, rows in enumerate(steps):
      assert len(rows) >= 1
      if sizes[group] == 0:
        assert len(rows) == 1 and rows[0][1] >= rows[0][2]
      blocks = [block for block, _, _ in rows]
      assert blocks == list(range(blocks[0], blocks[0] + len(blocks)))
      assert 0 <= blocks[0] and blocks[-1] < num_blocks
      for block, lo, hi in rows:
        idx = np.arange(block * block_k + max(lo, 0), block * block_k + min(hi, block_k))
        assert (idx < m).all() and (owner[idx] == group).all()
        kept[idx] += 1
    assert (kept == 1).all()


def test_group_row_blocks_in_jax_matches_numpy():
  """The kernel evaluates group_row_blocks with lax ops on int32 scalars; same answers."""
  block_k, num_blocks = 64, 16
  cases = [(0, 0), (0, 1), (63, 64), (64, 64), (100, 700), (960, 1000), (1024, 1024), (1000, 1000)]

  @jax.jit
  def blocks(start, end):
    return gmm_hopper.group_row_blocks(start, end, block_k, num_blocks, ops=gmm_hopper._jax_ops())

  for start, end in cases:
    want = gmm_hopper.group_row_blocks(start, end, block_k, num_blocks)
    got = blocks(jnp.int32(start), jnp.int32(end))
    assert [int(x) for x in got] == [int(x) for x in want]


def test_weight_gradient_tiles_follow_the_transposed_kernel():
  """gmm's shape check: the two-warpgroup transposed kernel's CTA holds two warpgroup tiles
  along K (wg_dim='m') or N ('n'); JAX's kernel one tile. Only the new kernel gets wg_dim."""
  from mas_jax.layers import grouped_matmul as gmm_lib

  t, narrow = gmm_lib.Tiling, gmm_lib.Tiling(block_n=64)
  assert gmm_lib.two_warpgroup_kernels().transposed is gmm_hopper.transposed_ragged_dot
  with pytest.raises(ValueError, match=r'weight gradient \[192, 256\] .* tiles \[128, 256\]'):
    gmm_lib.check_shapes(8, 192, 256, narrow, narrow, t(64, 256, wg_dim='m'))
  gmm_lib.check_shapes(8, 128, 256, narrow, narrow, t(128, 128, wg_dim='n'))
  with pytest.raises(ValueError, match=r'weight gradient \[128, 384\] .* tiles \[128, 256\]'):
    gmm_lib.check_shapes(8, 128, 384, narrow, narrow, t(128, 128, wg_dim='n'))
  gmm_lib.check_shapes(8, 192, 256, t(), narrow, t(64, 256), two_warpgroups=False)
  assert gmm_lib.Tiling(64, 256, wg_dim='m').kwargs()['wg_dim'] == 'm'
  assert 'wg_dim' not in gmm_lib.Tiling(64, 256).kwargs()
  for tilings in (gmm_lib.WIDENING_TILINGS, gmm_lib.NARROWING_TILINGS, gmm_lib.DEFAULT_TILINGS):
    assert tilings[2].wg_dim == 'm'


def test_stage_schedule_reuses_a_stage_only_after_its_last_user():
  """The transposed kernel's stage ring runs on across a CTA's output tiles: step i of the
  whole CTA uses stage i % stages, and the memory warpgroup reloads a stage only after waiting
  for the consumption of its previous user, the step `stages` before (the k-th wait on a
  stage's barrier is its k-th phase: no other step used the stage in between)."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    stages = int(rng.integers(2, 6))
    tile_steps = rng.integers(1, 7, int(rng.integers(1, 8))).tolist()
    sched = gmm_hopper.stage_schedule(tile_steps, stages)
    assert [(t, ki) for t, ki, _, _ in sched] == [
      (t, ki) for t, s in enumerate(tile_steps) for ki in range(s)
    ]
    last_user = {}
    for step, (_, _, slot, reuse) in enumerate(sched):
      assert reuse == last_user.get(slot, -1)
      if reuse >= 0:
        assert step - reuse == stages  # Exactly `stages` steps in flight at most.
      last_user[slot] = step
    assert len(last_user) == min(stages, sum(tile_steps))


@pytest.mark.parametrize(
  'block_n,epi_n,slots', [(256, 64, 2), (256, 64, 4), (128, 64, 2), (64, 64, 1)]
)
def test_epilogue_chunks_never_overwrite_a_slot_still_being_read(block_n, epi_n, slots):
  """Over several tiles' epilogues, each wait (all but the newest `pending` stores done
  reading, in order) leaves no store still reading the slot about to be rewritten."""
  chunks = gmm_hopper.epilogue_chunks(block_n, epi_n, slots)
  assert len(chunks) == block_n // epi_n
  reading = []  # Slots of the stores still reading shared memory, oldest first.
  for _ in range(3):
    for slot, pending in chunks:
      del reading[: max(len(reading) - pending, 0)]
      assert slot not in reading
      reading.append(slot)
  with pytest.raises(ValueError, match='not a multiple'):
    gmm_hopper.epilogue_chunks(256, 64, 3)
