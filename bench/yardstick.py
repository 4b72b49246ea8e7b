"""Yardstick: a plain-JAX MoE transformer train step at the seed's layer shapes, on one device.

The in-repo baseline for mas-jax's own train step (bench/gpu_bench.py): what a straightforward JAX
program reaches on the same GPU. It imports neither flax nor mas_jax and shares no code with
them, so the ratio of the two MFUs measured in one device call shows what the library adds (or
costs) over plain JAX.

The model is configs/paper.py's at one layer (`--layers`): vocabulary 32000, d_model 4096, 32
heads of 128 with RoPE, RMSNorm before each block, a top-2 softmax router over 16 experts with
capacity 1.25 per sequence (every token's first choice is placed before any second choice), expert
FFN 4096 -> 16384 -> 4096 with tanh GELU, untied embedding and unembedding, the Switch
load-balancing loss (1e-2) and the router z-loss (1e-3). Parameters and AdamW moments are float32,
matmuls run in bfloat16. One jitted function does forward, backward, global-norm clipping (1.0)
and AdamW (b1 0.9, b2 0.95, weight decay 0.1 on matrices, constant learning rate), with the train
state donated. The defaults otherwise follow the shared yardstick that docs/benchmarks/README.md
quotes (../shared/bench/yardstick_moe_step.py, not in this repository): batch 4 x 2048 tokens,
full remat of each block, cuDNN attention, no expert dropout.

Timing: the median of --steps calls after --warmup calls, each synchronised on the new state.
FLOPs: the convention of mas_jax/metrics.py (mas_jax/perf/model.py), restated in
`train_flops_per_token`; MFU is against --peak_tflops (989: the H100 dense bf16 datasheet peak).

  python bench/yardstick.py                   # on a GPU -> docs/benchmarks/<device>_yardstick.json
  python bench/yardstick.py --batch=8 --remat=none    # gpu_bench's batch-8 row, without dropout
  python bench/yardstick.py --smoke           # tiny shapes on CPU in seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Shape:
  """The model and batch. Dims: B batch, T tokens, D d_model, N heads, H head_dim, E experts,
  K top_k, C capacity, F expert hidden, V vocab, L layers."""

  vocab: int = 32000
  layers: int = 1
  d_model: int = 4096
  heads: int = 32
  head_dim: int = 128
  experts: int = 16
  top_k: int = 2
  expert_hidden: int = 16384
  seq: int = 2048
  batch: int = 4
  capacity_factor: float = 1.25

  @property
  def capacity(self) -> int:
    """Slots per expert and sequence (configs/tiny.py's formula)."""
    return min(self.seq, math.ceil(self.capacity_factor * self.seq * self.top_k / self.experts))


SMOKE = Shape(
  vocab=256,
  layers=2,
  d_model=64,
  heads=4,
  head_dim=16,
  experts=4,
  expert_hidden=128,
  seq=32,
  batch=2,
)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  learning_rate: float = 3e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  aux_loss_coef: float = 1e-2
  z_loss_coef: float = 1e-3


# ------------------------------------------------------------------------------------------------
# Parameters and the FLOP convention.
# ------------------------------------------------------------------------------------------------


def init_params(key: jax.Array, s: Shape) -> dict:
  """float32 parameters: normal / sqrt(fan_in) matrices, unit norm scales."""
  d, n, h, e, f = s.d_model, s.heads, s.head_dim, s.experts, s.expert_hidden

  def normal(key, shape, fan_in):
    return jax.random.normal(key, shape, F32) / math.sqrt(fan_in)

  keys = jax.random.split(key, s.layers + 2)
  layers = []
  for layer_key in keys[: s.layers]:
    k = jax.random.split(layer_key, 7)
    layers.append(
      {
        'attn_norm': jnp.ones((d,), F32),
        'wq': normal(k[0], (d, n, h), d),
        'wk': normal(k[1], (d, n, h), d),
        'wv': normal(k[2], (d, n, h), d),
        'wo': normal(k[3], (n, h, d), n * h),
        'moe_norm': jnp.ones((d,), F32),
        'w_router': normal(k[4], (d, e), d),
        'w_in': normal(k[5], (e, d, f), d),
        'w_out': normal(k[6], (e, f, d), f),
      }
    )
  return {
    'embed': normal(keys[-2], (s.vocab, d), 1),
    'layers': layers,
    'final_norm': jnp.ones((d,), F32),
    'unembed': normal(keys[-1], (d, s.vocab), d),
  }


def param_count(s: Shape) -> int:
  d, nh = s.d_model, s.heads * s.head_dim
  per_layer = 2 * d + 4 * d * nh + d * s.experts + s.experts * 2 * d * s.expert_hidden
  return s.layers * per_layer + 2 * s.vocab * d + d


def train_flops_per_token(s: Shape) -> float:
  """Model FLOPs of one training token: 6 x active matmul parameters (wq, wk, wv, wo, router, the
  top_k experts' two matrices, unembedding) + 6 x L x T x N*H of causal attention; recomputation
  and capacity padding are not counted (the convention of mas_jax/metrics.py)."""
  d, nh = s.d_model, s.heads * s.head_dim
  active = s.layers * (4 * d * nh + d * s.experts + s.top_k * 2 * d * s.expert_hidden)
  active += d * s.vocab
  return 6.0 * active + 6.0 * s.layers * s.seq * nh


# ------------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x [..., D] in bf16 -> normalised in float32, scaled, back in bf16."""
  x32 = x.astype(F32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
  return (y * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(BF16)


def rope(x: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding of x [B, T, N, H] (rotating the two halves of H)."""
  t, h = x.shape[1], x.shape[-1]
  freq = base ** (-jnp.arange(0, h // 2, dtype=F32) * 2 / h)  # [H/2]
  angle = jnp.arange(t, dtype=F32)[:, None] * freq[None, :]  # [T, H/2]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(x: jax.Array, p: dict, implementation: str) -> jax.Array:
  """Causal self-attention of x [B, T, D] (bf16) -> [B, T, D]."""
  q = rope(jnp.einsum('BTD,DNH->BTNH', x, p['wq'].astype(BF16)))
  k = rope(jnp.einsum('BTD,DNH->BTNH', x, p['wk'].astype(BF16)))
  v = jnp.einsum('BTD,DNH->BTNH', x, p['wv'].astype(BF16))
  out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return jnp.einsum('BTNH,NHD->BTD', out, p['wo'].astype(BF16))


def moe(x: jax.Array, p: dict, s: Shape) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k MoE FFN of x [B, T, D] (normed, bf16), capacity per sequence.

  Returns the output [B, T, D], the Switch load-balancing loss and the router z-loss.
  """
  b, t, d = x.shape
  e, k, c = s.experts, s.top_k, s.capacity
  logits = jnp.einsum('BTD,DE->BTE', x, p['w_router'].astype(BF16)).astype(F32)
  probs = jax.nn.softmax(logits, axis=-1)
  gates, experts = jax.lax.top_k(probs, k)  # [B, T, K]
  gates = gates / jnp.sum(gates, axis=-1, keepdims=True)

  # Slot of each (token, choice) in its expert's buffer, choice-major: all first choices first.
  onehot = jax.nn.one_hot(jnp.swapaxes(experts, 1, 2).reshape(b, k * t), e, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # [B, K*T]
  position = jnp.swapaxes(position.reshape(b, k, t), 1, 2)  # [B, T, K]
  kept = position < c
  slot = jnp.where(kept, experts * c + position, e * c)  # e * c: the overflow row, discarded

  def dispatch(x_s, slot_s):  # [T, D], [T, K] -> [E, C, D]
    rows = jnp.repeat(x_s, k, axis=0)  # [T*K, D], token-major like slot_s.reshape(-1)
    buf = jnp.zeros((e * c + 1, d), x_s.dtype).at[slot_s.reshape(-1)].set(rows)
    return buf[:-1].reshape(e, c, d)

  xe = jax.vmap(dispatch)(x, slot)  # [B, E, C, D]
  hidden = jnp.einsum('BECD,EDF->BECF', xe, p['w_in'].astype(BF16))
  hidden = jax.nn.gelu(hidden, approximate=True)
  ye = jnp.einsum('BECF,EFD->BECD', hidden, p['w_out'].astype(BF16))
  ye = jnp.concatenate([ye.reshape(b, e * c, d), jnp.zeros((b, 1, d), ye.dtype)], axis=1)
  picked = jnp.take_along_axis(ye, slot.reshape(b, t * k, 1), axis=1).reshape(b, t, k, d)
  out = jnp.einsum('BTKD,BTK->BTD', picked, (gates * kept).astype(BF16))

  # f_e: share of the top-k assignments routed to e; P_e: mean gate probability of e.
  routed = jnp.mean(jax.nn.one_hot(experts, e, dtype=F32), axis=(1, 2))  # [B, E]
  aux = e * jnp.mean(jnp.sum(routed * jnp.mean(probs, axis=1), axis=-1))
  z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
  return out, aux, z


def block(x: jax.Array, p: dict, s: Shape, implementation: str):
  """One pre-norm decoder block: x [B, T, D] -> (x, aux loss, z-loss)."""
  x = x + attention(rms_norm(x, p['attn_norm']), p, implementation)
  y, aux, z = moe(rms_norm(x, p['moe_norm']), p, s)
  return x + y, aux, z


def loss_fn(params: dict, tokens: jax.Array, s: Shape, opt: Optimizer, remat: str, attn: str):
  """Next-token cross-entropy of tokens [B, T + 1] plus the router losses."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  x = jnp.take(params['embed'], inputs, axis=0).astype(BF16)  # [B, T, D]
  step = functools.partial(block, s=s, implementation=attn)
  if remat == 'full':
    step = jax.checkpoint(step)
  aux, z = 0.0, 0.0
  for p in params['layers']:
    x, a, zz = step(x, p)
    aux, z = aux + a, z + zz
  x = rms_norm(x, params['final_norm'])
  logits = jnp.einsum('BTD,DV->BTV', x, params['unembed'].astype(BF16)).astype(F32)
  label = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - label)
  return ce + opt.aux_loss_coef * aux + opt.z_loss_coef * z, ce


# ------------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------------


def init_state(params: dict) -> dict:
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return {'params': params, 'mu': zeros(params), 'nu': zeros(params), 'count': jnp.zeros((), F32)}


def adamw(state: dict, grads: dict, opt: Optimizer) -> dict:
  """Global-norm clipping, then AdamW with bias correction; decay on matrices only."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, opt.grad_clip / (norm + 1e-6)), grads)
  count = state['count'] + 1
  mu = jax.tree.map(lambda m, g: opt.b1 * m + (1 - opt.b1) * g, state['mu'], grads)
  nu = jax.tree.map(lambda v, g: opt.b2 * v + (1 - opt.b2) * g * g, state['nu'], grads)

  def update(p, m, v):
    m_hat, v_hat = m / (1 - opt.b1**count), v / (1 - opt.b2**count)
    delta = m_hat / (jnp.sqrt(v_hat) + opt.eps)
    if p.ndim >= 2:
      delta = delta + opt.weight_decay * p
    return p - opt.learning_rate * delta

  params = jax.tree.map(update, state['params'], mu, nu)
  return {'params': params, 'mu': mu, 'nu': nu, 'count': count}


def train_step(state: dict, tokens: jax.Array, s: Shape, opt: Optimizer, remat: str, attn: str):
  (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state['params'], tokens, s, opt, remat, attn
  )
  return adamw(state, grads, opt), ce


# ------------------------------------------------------------------------------------------------
# Timing and the result.
# ------------------------------------------------------------------------------------------------


def command_line() -> str:
  """The running command as one shell line (bench/common.py's `command_line`, repeated here so
  that this file imports nothing of the project)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = [
    f'{k}={shlex.quote(v)}'
    for k, v in sorted(os.environ.items())
    if k.startswith('XLA_') or k == 'JAX_PLATFORMS'
  ]
  path = os.path.relpath(os.path.abspath(__file__), root)
  return ' '.join([*env, 'python', path, *map(shlex.quote, sys.argv[1:])])


def measure(s: Shape, opt: Optimizer, remat: str, attn: str, warmup: int, steps: int) -> dict:
  """Compiles the step, runs `warmup` steps, then times `steps` steps (median)."""
  state = init_state(init_params(jax.random.key(0), s))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, s.vocab, (s.batch, s.seq + 1), np.int32))
  step = jax.jit(
    functools.partial(train_step, s=s, opt=opt, remat=remat, attn=attn), donate_argnums=0
  )
  start = time.perf_counter()
  compiled = step.lower(state, tokens).compile()
  compile_s = time.perf_counter() - start
  losses = []
  for _ in range(warmup):
    state, ce = compiled(state, tokens)
    losses.append(float(ce))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, ce = compiled(state, tokens)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
    losses.append(float(ce))
  mem = compiled.memory_analysis()
  return {
    'compile_s': compile_s,
    'step_s': statistics.median(times),
    'step_times_s': times,
    'losses': losses,
    'memory_gb': None
    if mem is None
    else (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 1e9,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--smoke', action='store_true', help='tiny shapes on CPU (seconds)')
  parser.add_argument('--out', default=None, help='JSON path (docs/benchmarks/<device>_...)')
  parser.add_argument('--layers', type=int, default=1)
  parser.add_argument('--experts', type=int, default=16)
  parser.add_argument('--batch', type=int, default=4, help='sequences of 2048 tokens')
  parser.add_argument('--remat', choices=('full', 'none'), default='full')
  parser.add_argument('--attention', choices=('cudnn', 'xla'), default='cudnn')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--peak_tflops', type=float, default=989.0, help='dense bf16 datasheet')
  args = parser.parse_args()
  if args.smoke:  # the XLA attention: cuDNN runs on GPUs only
    s, attn, warmup, steps = SMOKE, 'xla', 1, 2
  else:
    s = Shape(layers=args.layers, experts=args.experts, batch=args.batch)
    attn, warmup, steps = args.attention, args.warmup, args.steps
  opt = Optimizer()
  device = jax.devices()[0].device_kind
  stem = 'cpu_smoke' if args.smoke else re.sub(r'[^a-z0-9]+', '_', device.lower()).strip('_')
  out = args.out or f'docs/benchmarks/{stem}_yardstick.json'

  m = measure(s, opt, args.remat, attn, warmup, steps)
  tokens = s.batch * s.seq
  flops = train_flops_per_token(s) * tokens
  result = {
    'device': device,
    'jax': jax.__version__,
    'command': command_line(),
    'shape': dataclasses.asdict(s),
    'capacity': s.capacity,
    'optimizer': dataclasses.asdict(opt),
    'remat': args.remat,
    'attention': attn,
    'warmup': warmup,
    'steps': steps,
    'params': param_count(s),
    'tokens_per_step': tokens,
    'model_tflop_per_step': flops / 1e12,
    **m,
    'tokens_per_s': tokens / m['step_s'],
    'model_tflops': flops / m['step_s'] / 1e12,
    'peak_tflops': args.peak_tflops,
    'mfu': flops / m['step_s'] / (args.peak_tflops * 1e12),
  }
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  print(
    f'{device}: {s.layers} layer(s), {s.experts} experts, batch {s.batch} x {s.seq}, remat '
    f'{args.remat}, {attn} attention: step {m["step_s"] * 1e3:.1f} ms (median of {steps}), '
    f'{result["tokens_per_s"]:,.0f} tokens/s, {result["model_tflops"]:.0f} TFLOP/s, MFU '
    f'{result["mfu"]:.1%} of {args.peak_tflops:.0f}; loss {m["losses"][0]:.3f} -> '
    f'{m["losses"][-1]:.3f}; wrote {out}'
  )


if __name__ == '__main__':
  main()
