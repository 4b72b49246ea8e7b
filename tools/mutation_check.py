"""Planted bugs: does each one make the tests that should catch it fail?

Every bug is one exact text replacement (file, old -> new; `old` must occur exactly once). The
tool copies the repository to a temporary directory (the working tree's tracked and untracked,
not ignored, files by default; `--head` clones the last commit instead), then for each bug
applies the replacement, runs `python -m pytest -x -q` on the bug's test files there, and puts
the file back. It prints a markdown table (caught / missed, the test that failed, seconds per
bug) and exits 1 if a bug is missed, a replacement does not apply exactly once, or a run ends
in a pytest usage error or the timeout.

Slow (each bug runs its test files from a fresh process): not part of the test suite.

  .venv/bin/python tools/mutation_check.py --list
  .venv/bin/python tools/mutation_check.py                      # every bug
  .venv/bin/python tools/mutation_check.py --only ep_return_all_to_all_swapped --only ...
  .venv/bin/python tools/mutation_check.py --baseline           # the unmodified tests first
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
STRATEGY_TESTS = ('tests/test_strategy_values.py',)
GOLDEN = 'tests/test_golden.py'


@dataclasses.dataclass(frozen=True)
class Bug:
  """A planted bug: replace `old` (exactly one occurrence) by `new` in `file`."""

  name: str
  description: str
  file: str
  old: str
  new: str
  # Test files, or node ids (file::test), run in this order with -x.
  tests: tuple[str, ...]


BUGS = [
  # ---- The strategies' communication (tests/test_strategy_values.py). ----
  Bug(
    'ma_sep_hier_outer_psum_dropped',
    'ma_sep all_to_all dispatch, hierarchical all-reduce of the attention partials: the '
    'reduction across rows is dropped (each row keeps only its own heads)',
    'mas_jax/strategies/ma_separation.py',
    'attn = lax.psum(lax.psum(contrib[0], EXPERT_AXIS), ATTN_AXIS)',
    'attn = lax.psum(contrib[0], EXPERT_AXIS)',
    STRATEGY_TESTS,
  ),
  Bug(
    'ma_sep_hier_outer_psum_dropped_replicated',
    'ma_sep replicated dispatch, hierarchical all-reduce of both slots: the reduction across '
    'rows is dropped',
    'mas_jax/strategies/ma_separation.py',
    'return lax.psum(lax.psum(contrib, EXPERT_AXIS), ATTN_AXIS)',
    'return lax.psum(contrib, EXPERT_AXIS)',
    STRATEGY_TESTS,
  ),
  Bug(
    'ma_sep_moe_return_skips_a_row',
    'ma_sep all_to_all dispatch: the ppermutes carry the MoE output to every attention row but '
    'the last',
    'mas_jax/strategies/ma_separation.py',
    'for row in range(expert_row):',
    'for row in range(expert_row - 1):',
    STRATEGY_TESTS,
  ),
  Bug(
    'tp_attention_psum_removed',
    "tp_pp: the attention output projection's partial sum over heads is not psum-ed over 'tensor'",
    'mas_jax/strategies/tp_pp.py',
    'return lax.psum(out, TENSOR_AXIS), kv',
    'return out, kv',
    STRATEGY_TESTS,
  ),
  Bug(
    'tp_moe_psum_removed',
    "tp_pp: the MoE output's partial sum over the expert hidden dim is not psum-ed over 'tensor'",
    'mas_jax/strategies/tp_pp.py',
    'y = lax.psum(y, TENSOR_AXIS)  # y[G,S,D]{U_tensor} -> y[G,S,D]',
    'y = y  # psum removed',
    STRATEGY_TESTS,
  ),
  Bug(
    'ep_return_all_to_all_swapped',
    'ep: the return all_to_all with split and concat axes swapped (traces when E/ep divides by '
    'ep; the combine then gathers the wrong slots)',
    'mas_jax/strategies/ep.py',
    'ye_local = lax.all_to_all(ye_local, EXPERT_AXIS, 0, 1, tiled=True)',
    'ye_local = lax.all_to_all(ye_local, EXPERT_AXIS, 1, 0, tiled=True)',
    STRATEGY_TESTS,
  ),
  # ---- Shared math (tests/test_golden.py and the unit tests). ----
  Bug(
    'rope_on_q_only',
    'RoPE applied to the queries only, not to the keys',
    'mas_jax/layers/attention.py',
    'return rope(q, positions, rope_base), rope(k, positions, rope_base), v',
    'return rope(q, positions, rope_base), k, v',
    (GOLDEN, 'tests/test_model.py'),
  ),
  Bug(
    'z_loss_not_squared',
    'router z-loss sums logsumexp(logits) instead of its square',
    'mas_jax/layers/moe.py',
    "z = jnp.square(jax.nn.logsumexp(route['logits'], axis=-1))",
    "z = jax.nn.logsumexp(route['logits'], axis=-1)",
    (GOLDEN, 'tests/test_model.py'),
  ),
  Bug(
    'packed_without_eos',
    'C4 documents are packed into the token stream without their EOS',
    'mas_jax/data/c4.py',
    'yield np.asarray(self.tokenizer.encode(text) + [eos], np.int32)',
    'yield np.asarray(self.tokenizer.encode(text), np.int32)',
    (GOLDEN, 'tests/test_data.py'),
  ),
  Bug(
    'dropout_mask_one_key',
    'the expert dropout mask ignores (group, expert): every block draws from the same key',
    'mas_jax/layers/moe.py',
    'jax.random.fold_in(jax.random.fold_in(key, g), e), 1.0 - rate, shape',
    'key, 1.0 - rate, shape',
    (GOLDEN, 'tests/test_model.py'),
  ),
  Bug(
    'weight_decay_on_norms',
    'AdamW weight decay also applied to the norm scales',
    'mas_jax/train_lib.py',
    "return not any('norm' in n or 'bias' in n for n in names)",
    "return not any('bias' in n for n in names)",
    (GOLDEN, 'tests/test_train.py'),
  ),
  Bug(
    'same_dropout_key_every_layer',
    'every layer gets the same dropout key',
    'mas_jax/model.py',
    'jax.random.fold_in(dropout_key, i))(jnp.arange(num_layers))',
    'jax.random.fold_in(dropout_key, 0 * i))(jnp.arange(num_layers))',
    (GOLDEN, 'tests/test_model.py'),
  ),
  # ---- Further realistic bugs, with the tests that catch them today. ----
  Bug(
    'cache_mask_off_by_one',
    'decode attention also reads the first unfilled cache entry (<= cache_len)',
    'mas_jax/layers/attention.py',
    'filled = jnp.arange(k_cache.shape[1])[None, :] < cache_len[:, None]',
    'filled = jnp.arange(k_cache.shape[1])[None, :] <= cache_len[:, None]',
    ('tests/test_decode.py::test_cached_attention_sees_only_the_filled_cache',),
  ),
  Bug(
    'grad_accum_sums_not_means',
    'gradient accumulation sums the micro-batch gradients (the 1/steps is missing)',
    'mas_jax/train_lib.py',
    'lambda a, g: a + g / steps, acc, grads',
    'lambda a, g: a + g, acc, grads',
    ('tests/test_train.py::test_gradient_accumulation_matches_one_big_batch',),
  ),
  Bug(
    'param_bytes_ignore_sharding',
    'the start-up memory line counts every parameter whole, ignoring its PartitionSpec',
    'mas_jax/strategies/ep.py',
    'return math.prod(p.shape) * jnp.dtype(p.dtype).itemsize // shards',
    'return math.prod(p.shape) * jnp.dtype(p.dtype).itemsize',
    ('tests/test_ep.py::test_ep_describe_reports_parameter_bytes',),
  ),
  Bug(
    'gates_not_renormalised',
    'top-k gates are the raw softmax probabilities, not renormalised over the k choices',
    'mas_jax/layers/moe.py',
    'gates = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)',
    'gates = top_probs',
    ('tests/test_model.py::test_router_selection_and_gates',),
  ),
  Bug(
    'capacity_rounds_down',
    'expert capacity rounded down instead of up (drops tokens the capacity factor pays for)',
    'mas_jax/layers/moe.py',
    'math.ceil(capacity_factor * seq_len * top_k / num_experts)',
    'math.floor(capacity_factor * seq_len * top_k / num_experts)',
    ('tests/test_model.py::test_capacity_drops_in_switch_order',),
  ),
]


@dataclasses.dataclass
class Result:
  bug: Bug
  status: str  # caught | missed | not applied | no tests | error | timeout
  seconds: float = 0.0
  detail: str = ''

  @property
  def ok(self) -> bool:
    return self.status == 'caught'


def snapshot(dest: pathlib.Path, head: bool) -> None:
  """The repository at dest: HEAD (a clone), or the working tree's non-ignored files."""
  if head:
    subprocess.run(['git', 'clone', '-q', str(REPO), str(dest)], check=True)
    return
  listed = subprocess.run(
    ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
    cwd=REPO,
    check=True,
    capture_output=True,
  ).stdout.decode()
  for rel in filter(None, listed.split('\0')):
    src = REPO / rel
    if src.is_file():  # a tracked file deleted in the working tree is left out
      (dest / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / rel)


def failure_line(output: str) -> str:
  """The first failing test's id, with its first error line (and NumPy's max differences)."""
  test = next(
    (
      line.split(' ', 1)[1].split(' - ')[0]
      for line in output.splitlines()
      if line.startswith(('FAILED ', 'ERROR '))
    ),
    '',
  )
  errors = [line[1:].strip() for line in output.splitlines() if line.startswith('E ')]
  errors = [e for e in errors if e]
  picked = errors[:1] + [e for e in errors[1:] if e.startswith('Max ')][:2]
  return f'{test}: {"; ".join(picked)}'[:300] if test else ''


def run_bug(root: pathlib.Path, bug: Bug, python: str, timeout: float, env: dict) -> Result:
  path = root / bug.file
  if not path.is_file():
    return Result(bug, 'not applied', detail=f'{bug.file} does not exist')
  original = path.read_text()
  count = original.count(bug.old)
  if count != 1:
    return Result(bug, 'not applied', detail=f'`old` found {count} times in {bug.file}')
  tests = [t for t in bug.tests if (root / t.split('::')[0]).is_file()]
  absent = [t for t in bug.tests if t not in tests]
  note = f' (absent: {", ".join(absent)})' if absent else ''
  if not tests:
    return Result(bug, 'no tests', detail=f'none of {", ".join(bug.tests)} exists')
  path.write_text(original.replace(bug.old, bug.new))
  start = time.perf_counter()
  try:
    proc = subprocess.run(
      [python, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests],
      cwd=root,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
    )
  except subprocess.TimeoutExpired:
    return Result(bug, 'timeout', time.perf_counter() - start, f'over {timeout:.0f} s{note}')
  finally:
    path.write_text(original)
  seconds = time.perf_counter() - start
  output = proc.stdout + proc.stderr
  if proc.returncode == 0:
    return Result(bug, 'missed', seconds, f'{", ".join(tests)} passed{note}')
  if proc.returncode in (1, 2):  # tests failed / collection errors
    return Result(bug, 'caught', seconds, (failure_line(output) or output[-160:]) + note)
  tail = ' '.join(output.strip().splitlines()[-2:])[-160:]
  return Result(bug, 'error', seconds, f'pytest exit {proc.returncode}: {tail}{note}')


def baseline(root: pathlib.Path, bugs: list[Bug], python: str, timeout: float, env: dict) -> bool:
  """Runs each distinct test selection unmodified; True if all pass."""
  ok = True
  for tests in dict.fromkeys(b.tests for b in bugs):
    present = [t for t in tests if (root / t.split('::')[0]).is_file()]
    if not present:
      continue
    start = time.perf_counter()
    cmd = [python, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *present]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    state = 'pass' if proc.returncode == 0 else f'FAIL (exit {proc.returncode})'
    print(f'baseline {" ".join(present)}: {state} in {seconds:.0f} s', flush=True)
    if proc.returncode:
      print(failure_line(proc.stdout + proc.stderr))
      ok = False
  return ok


def table(results: list[Result]) -> str:
  cell = lambda s: s.replace('|', '\\|').replace('\n', ' ')
  lines = ['| bug | file | result | time (s) | failing test / detail |', '|---|---|---|---:|---|']
  for r in results:
    lines.append(
      f'| {r.bug.name} | {r.bug.file} | {r.status} | {r.seconds:.0f} | {cell(r.detail)} |'
    )
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--list', action='store_true', help='list the bugs and exit')
  parser.add_argument('--only', action='append', metavar='NAME', help='run this bug (repeatable)')
  parser.add_argument('--head', action='store_true', help='test the last commit, not the tree')
  parser.add_argument('--baseline', action='store_true', help='run the unmodified tests first')
  parser.add_argument('--timeout', type=float, default=900, help='seconds per bug (default 900)')
  default_python = REPO / '.venv' / 'bin' / 'python'
  parser.add_argument(
    '--python',
    default=str(default_python if default_python.exists() else sys.executable),
    help='interpreter that runs pytest (default: the repo .venv)',
  )
  parser.add_argument('--keep', action='store_true', help='keep the temporary copy')
  args = parser.parse_args(argv)

  if args.list:
    for b in BUGS:
      print(f'{b.name}\n  {b.description}\n  {b.file}; tests: {" ".join(b.tests)}')
    return 0
  bugs = BUGS
  if args.only:
    unknown = sorted(set(args.only) - {b.name for b in BUGS})
    if unknown:
      parser.error(f'unknown bug(s) {unknown}; see --list')
    bugs = [b for b in BUGS if b.name in args.only]

  work = pathlib.Path(tempfile.mkdtemp(prefix='mas_jax_mutation_'))
  root = work / 'repo'
  root.mkdir()
  env = {
    **os.environ,
    'PYTHONDONTWRITEBYTECODE': '1',  # no stale .pyc of a mutated file
    'COLUMNS': '400',  # pytest cuts the short summary's messages to the terminal width
    'JAX_COMPILATION_CACHE_DIR': str(work / 'jit_cache'),  # shared by the runs (keyed by HLO)
  }
  env.pop('PYTHONPATH', None)
  try:
    snapshot(root, args.head)
    print(f'copy of {REPO} ({"HEAD" if args.head else "working tree"}) at {root}', flush=True)
    if args.baseline and not baseline(root, bugs, args.python, args.timeout, env):
      print('baseline: the unmodified tests fail; a "caught" would mean nothing')
      return 1
    results = []
    for bug in bugs:
      print(f'{bug.name} ...', end=' ', flush=True)
      result = run_bug(root, bug, args.python, args.timeout, env)
      print(f'{result.status} ({result.seconds:.0f} s)', flush=True)
      results.append(result)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  print()
  print(table(results))
  caught = sum(r.ok for r in results)
  total_time = sum(r.seconds for r in results)
  print(f'\n{caught}/{len(results)} caught in {total_time:.0f} s')
  return 0 if caught == len(results) else 1


if __name__ == '__main__':
  sys.exit(main())
