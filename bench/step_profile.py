"""Where one train step's device time goes: a `jax.profiler` trace of the mas-jax train step.

The step is the trainer's own (bench/common.py `build_train_step`: configs/paper.py with dotted
overrides, synthetic data). After warm-up, `--steps` steps run under `jax.profiler.trace`; every
kernel of the trace that XLA attributes to an HLO op of the step is summed per op, and each op is
classed from the compiled HLO text:
  kind   'matmul' (cuBLAS / Triton / CUTLASS gemms, dot ops), 'attention' (cuDNN fused attention),
         'copy' (copies, memcpy, memset), 'collective', or 'elementwise' (every other fusion:
         casts, GELU, norms, softmax, scatter and gather, reductions, the optimizer update);
  scope  the innermost of the named scopes the code sets (`SCOPES`: model.py's embed, attention,
         moe, head; moe.py's route, dispatch, experts, combine; train_lib's accumulate, optimizer,
         grad_norm), from the op's `op_name` metadata;
  pass   'backward' when the op_name holds `transpose(`, else 'forward'.
Kernels that XLA runs inside a CUDA graph (its command buffers) carry the graph's name; fusions
are found again by their kernel's name, library calls (cuBLAS, cuDNN) are not: run with
XLA_FLAGS=--xla_gpu_enable_command_buffer= to attribute every kernel (the command line the result
records shows it). The bytes an elementwise op moves are its operands' and its result's sizes
from the HLO shapes (read once, written once), so `bytes / time` is its achieved HBM rate.

  python bench/step_profile.py                  # the best train row with both levers, on a GPU
  python bench/step_profile.py --overrides='{"train.grad_accum_steps": 8}'   # on top of it
  python bench/step_profile.py --smoke          # tiny shapes on CPU (run by the test suite)
  python bench/step_profile.py --render=docs/benchmarks/<device>_profile.json   # markdown only
Writes <out>/<device>_profile.json and .md, and the compiled step's HLO <device>_profile.hlo.txt.gz
(the trace itself is left in a temporary folder unless --trace_dir is given).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import gpu_bench  # noqa: E402
import jax  # noqa: E402

from mas_jax import metrics as metrics_lib  # noqa: E402

# Named scopes set by the code, innermost wins (a dispatch op inside 'moe' is 'dispatch').
SCOPES = (
  'embed',
  'attention',
  'moe',
  'route',
  'dispatch',
  'experts',
  'combine',
  'head',
  'accumulate',
  'optimizer',
  'grad_norm',
)
DEFAULT = {**gpu_bench.BEST, 'train.mu_dtype': 'bfloat16', 'model.loss_chunk': gpu_bench.LOSS_CHUNK}
SMOKE = gpu_bench.SMOKE_TRAIN

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4}
_BYTES |= {'s32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8}
_SHAPE = re.compile(r'\b(pred|[suf]\d+|bf16|c64)\[([\d,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_GEMM_KERNEL = re.compile(r'gemm|xmma|nvjet|cutlass|cublas|wgmma|triton_dot', re.I)
_ATTN_KERNEL = re.compile(r'cudnn|sdpa|fmha|flash', re.I)
_CONTAINERS = ('while', 'conditional', 'call')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string ('(f32[2,3]{1,0}, bf16[4])' -> 32)."""
  total = 0
  for dtype, dims in _SHAPE.findall(shape):
    total += _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  """'f32[2]{0} fusion(%a), ...' -> ('f32[2]{0}', 'fusion(%a), ...'); tuple shapes too."""
  if rest.startswith('('):
    depth = 0
    for i, c in enumerate(rest):
      depth += c == '('
      depth -= c == ')'
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].lstrip()
  shape, _, tail = rest.partition(' ')
  return shape, tail


def hlo_ops(text: str) -> dict[str, dict]:
  """Every instruction of a compiled HLO module's text: name -> opcode, result and operand
  bytes, op_name metadata, fusion kind, custom-call target, and whether its fused computation
  holds a dot."""
  ops, computation, dots = {}, None, set()
  for line in text.splitlines():
    header = re.match(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header and ' = ' not in line:
      computation = header.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, rest = m.groups()
    shape, tail = _split_shape(rest)
    opcode = tail.split('(', 1)[0].strip()
    if opcode in ('dot', 'convolution'):
      dots.add(computation)
    args = tail.split('(', 1)[1] if '(' in tail else ''
    operands = re.findall(r'%([\w.\-]+)', args.split(')', 1)[0])
    field = lambda key, t=tail: (re.search(key + r'="?([^",}]+)', t) or [None, None])[1]  # noqa: E731
    ops[name] = {
      'opcode': opcode,
      'out_bytes': shape_bytes(shape),
      'operands': operands,
      'op_name': (re.search(r'op_name="([^"]*)"', tail) or [None, ''])[1],
      'fusion_kind': field('kind'),
      'calls': field('calls'),
      'target': field('custom_call_target'),
      'computation': computation,
    }
  for op in ops.values():
    op['in_bytes'] = sum(ops[o]['out_bytes'] for o in op['operands'] if o in ops)
    op['has_dot'] = op['calls'] is not None and op['calls'].lstrip('%') in dots
  return ops


def classify(kernel: str, op: dict | None) -> tuple[str, str, str]:
  """(kind, scope, pass) of a kernel and the HLO op it belongs to (see the module docstring)."""
  op = op or {}
  opcode, target = op.get('opcode', ''), op.get('target') or ''
  if _ATTN_KERNEL.search(kernel) or 'cudnn' in target or 'fmha' in target:
    kind = 'attention'
  elif (
    _GEMM_KERNEL.search(kernel)
    or 'gemm' in target
    or 'matmul' in target
    or opcode in ('dot', 'convolution')
    or op.get('has_dot')
  ):
    kind = 'matmul'
  elif opcode.startswith(_COLLECTIVES) or 'nccl' in kernel.lower():
    kind = 'collective'
  elif opcode in ('copy', 'copy-start', 'copy-done') or re.search(r'memcpy|memset', kernel, re.I):
    kind = 'copy'
  else:
    kind = 'elementwise'
  path = op.get('op_name', '')
  parts = re.split(r'[/()]', path)
  scopes = [p for p in parts if p in SCOPES]
  scope = scopes[-1] if scopes else 'other'
  return kind, scope, 'backward' if 'transpose(' in path else 'forward'


def kernel_events(trace_dir: str, module: str) -> tuple[list[dict], list[str]]:
  """The trace's kernel events of HLO module `module`: device stream events on a GPU, the
  thunk executor's op events on a CPU. Returns the events and the threads they came from."""
  (path,) = glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*', '*.trace.json.gz'))
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  procs, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      procs[e['pid']] = e['args']['name']
    if e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  on_gpu = any(p.startswith('/device:GPU') for p in procs.values())

  def wanted(e) -> bool:
    args = e.get('args') or {}
    if e.get('ph') != 'X' or 'hlo_op' not in args or module not in args.get('hlo_module', ''):
      return False
    proc, thread = procs.get(e['pid'], ''), threads.get((e['pid'], e['tid']), '')
    if on_gpu:  # kernels on the device's streams, not the derived 'XLA Ops' lines
      return proc.startswith('/device:GPU') and thread.startswith('Stream')
    return not e['name'].startswith('end:')

  kept = [e for e in events if wanted(e)]
  used = sorted({f'{procs.get(e["pid"])} / {threads.get((e["pid"], e["tid"]))}' for e in kept})
  return kept, used


def profile(overrides: dict, steps: int, trace_dir: str | None) -> tuple[dict, str]:
  """Traces `steps` train steps after warm-up; returns the result and the compiled HLO text."""
  config, strategy, step, state, batch = common.build_train_step(overrides)
  for _ in range(2):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  untraced = (time.perf_counter() - start) / steps
  trace_dir = trace_dir or tempfile.mkdtemp(prefix='step_profile_')
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      state, _ = step(state, batch)
    jax.block_until_ready(state)
  text = step.as_text()
  ops = hlo_ops(text)
  module = re.search(r'HloModule\s+([\w.\-]+)', text).group(1)
  events, threads = kernel_events(trace_dir, module)
  if not events:
    raise SystemExit(f'no kernel events of HLO module {module} in the trace under {trace_dir}')

  # Inside a CUDA graph (XLA's command buffers) a kernel's hlo_op is the command buffer; an XLA
  # fusion's kernel is named after its op (dots -> underscores), library kernels are not.
  by_kernel_name = {name.replace('.', '_').replace('-', '_'): name for name in ops}
  per_kernel = collections.defaultdict(lambda: {'us': 0.0, 'calls': 0})
  for e in events:
    hlo_op = e['args']['hlo_op']
    if hlo_op.startswith('command_buffer'):
      hlo_op = by_kernel_name.get(e['name'], hlo_op)
    if ops.get(hlo_op, {}).get('opcode') in _CONTAINERS:
      continue  # a loop's or call's own event spans its body's kernels (CPU traces)
    key = (e['name'], hlo_op)
    per_kernel[key]['us'] += float(e['dur'])
    per_kernel[key]['calls'] += 1
  kernels = []
  for (name, hlo_op), v in per_kernel.items():
    op = ops.get(hlo_op)
    kind, scope, direction = classify(name, op)
    moved = (op['in_bytes'] + op['out_bytes']) * v['calls'] / steps if op else None
    ms = v['us'] / 1e3 / steps
    kernels.append(
      {
        'kernel': name,
        'hlo_op': hlo_op,
        'kind': kind,
        'scope': scope,
        'pass': direction,
        'ms_per_step': ms,
        'calls_per_step': v['calls'] / steps,
        'gb_per_step': None if moved is None else moved / 1e9,
        'gb_per_s': None if moved is None or ms == 0 else moved / 1e9 / (ms / 1e3),
      }
    )
  kernels.sort(key=lambda k: -k['ms_per_step'])
  groups = collections.defaultdict(lambda: {'ms_per_step': 0.0, 'gb_per_step': 0.0, 'kernels': 0})
  for k in kernels:
    g = groups[(k['kind'], k['scope'], k['pass'])]
    g['ms_per_step'] += k['ms_per_step']
    g['gb_per_step'] += k['gb_per_step'] or 0.0
    g['kernels'] += 1
  tokens = config.data.batch_size * config.data.seq_len
  flops = metrics_lib.train_flops_per_token(config.model, config.data.seq_len) * tokens
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
  result = {
    'command': common.command_line(__file__),
    'device': jax.devices()[0].device_kind,
    'jax': jax.__version__,
    'overrides': overrides,
    'params': metrics_lib.param_count(config.model)['total'],
    'steps_traced': steps,
    'step_s_untraced': untraced,
    'mfu_untraced': flops / untraced / (peak * len(strategy.devices)) if peak else None,
    'kernel_ms_per_step': sum(k['ms_per_step'] for k in kernels),
    'threads': threads,
    'groups': sorted(
      ({'kind': k, 'scope': s, 'pass': p, **v} for (k, s, p), v in groups.items()),
      key=lambda g: -g['ms_per_step'],
    ),
    'kernels': kernels,
  }
  return result, text


def markdown(r: dict, top: int = 30) -> str:
  """The profile's tables: time per (kind, scope, pass), then the top kernels."""
  total = r['kernel_ms_per_step']
  mfu = '' if r['mfu_untraced'] is None else f', MFU {r["mfu_untraced"]:.1%}'
  lines = [
    f'# Train-step profile on {r["device"]} (jax {r["jax"]})',
    '',
    f'Command: `{common.shell_command(r["command"])}`; overrides {json.dumps(r["overrides"])}.',
    f'Untraced step {r["step_s_untraced"] * 1e3:.1f} ms{mfu}; kernels of the traced steps '
    f'{total:.1f} ms per step (mean of {r["steps_traced"]}).',
    '',
    '| kind | scope | pass | ms per step | share of kernel time | GB moved (elementwise) | GB/s |',
    '|---|---|---|---|---|---|---|',
  ]
  for g in r['groups']:
    gb = g['gb_per_step'] if g['kind'] == 'elementwise' else None
    rate = '-' if not gb or not g['ms_per_step'] else f'{gb / (g["ms_per_step"] / 1e3):.0f}'
    lines.append(
      f'| {g["kind"]} | {g["scope"]} | {g["pass"]} | {g["ms_per_step"]:.2f} | '
      f'{g["ms_per_step"] / total:.1%} | {"-" if gb is None else f"{gb:.2f}"} | {rate} |'
    )
  lines += [
    '',
    f'Top {top} kernels (name cut at 60 characters):',
    '',
    '| kernel | HLO op | kind | scope | pass | ms per step | calls | GB/s |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for k in r['kernels'][:top]:
    rate = '-' if k['gb_per_s'] is None or k['kind'] != 'elementwise' else f'{k["gb_per_s"]:.0f}'
    lines.append(
      f'| `{k["kernel"][:60]}` | {k["hlo_op"]} | {k["kind"]} | {k["scope"]} | {k["pass"]} | '
      f'{k["ms_per_step"]:.2f} | {k["calls_per_step"]:g} | {rate} |'
    )
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true', help='tiny shapes (CPU smoke test)')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument(
    '--overrides', default='{}', help='JSON dict of dotted config overrides on top of the row'
  )
  parser.add_argument('--steps', type=int, default=3, help='steps traced')
  parser.add_argument('--trace_dir', default=None, help='keep the trace here')
  parser.add_argument('--stem', default=None, help='file stem (default: <device>_profile)')
  parser.add_argument('--render', default=None, help='rewrite the markdown of a saved result')
  args = parser.parse_args()
  if args.render:
    common.render(args.render, markdown)
    return
  try:
    extra = json.loads(args.overrides)
  except json.JSONDecodeError as e:
    raise SystemExit(f'--overrides={args.overrides!r} is not a JSON dict: {e}') from None
  if not isinstance(extra, dict):
    raise SystemExit(f'--overrides={args.overrides!r} is not a JSON dict')
  overrides = {'parallel.strategy': 'reference', **(SMOKE if args.smoke else DEFAULT), **extra}
  result, text = profile(overrides, args.steps, args.trace_dir)
  stem = args.stem or common.device_stem(args.smoke) + '_profile'
  common.write_result(args.out, stem, result, markdown(result))
  with gzip.open(os.path.join(args.out, stem + '.hlo.txt.gz'), 'wt') as f:
    f.write(text)
  print(markdown(result))


if __name__ == '__main__':
  main()
