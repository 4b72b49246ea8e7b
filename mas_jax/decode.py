"""Token generation under any strategy: batch padding, prefill, the decode loop, sampling.

The per-device math is `model.forward_cached` (layers/attention.py: `attention_cached`,
`cached_attention`, `write_cache`); each strategy places it (`Strategy.forward_cached`). This
module drives it:

  1. Prompts of different lengths are **right-padded** into tokens[B, P] (P the longest prompt),
     and the batch is padded with one-token dummy rows to a multiple of what the strategy needs
     (`Strategy.decode_batch_multiple`); dummy rows never show in results or token counts.
  2. Prefill runs all P positions of every row from position 0 and writes their keys and values
     into the cache. Row b's first new token comes from its logits at position len_b - 1.
     Padding positions past len_b are written too, but are never read: the decode step of row b
     attends to cache entries < its own position and overwrites them one by one.
  3. Each decode step feeds one token per row at its own position (RoPE and the causal mask are
     per row) and samples the next token: greedy (temperature 0) or from softmax(logits / T)
     restricted to the top-k tokens and/or the top-p nucleus.
  4. A row stops at EOS or after max_new_tokens; the loop stops when every real row has stopped.

Generation is dropless (`decode_config`): with capacity routing a token's MoE output depends on
the later tokens of its sequence, which decoding cannot see. A model trained with capacity
routing generates dropless.

Example:
  gen = decode.Generator(config, params, context=256)      # params in the reference layout
  result = gen.generate([[5, 17, 9], [3]], max_new_tokens=20)
  result.tokens, result.prefill_s, result.tpot_s, result.tokens_per_s
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mas_jax import strategies
from mas_jax.config import Config, ConfigError
from mas_jax.strategies import base

# Dummy rows a batch may be padded with before giving up (the largest multiple any strategy asks
# for is a few times the device count).
_MAX_BATCH_PADDING = 4096


def decode_config(config: Config, batch: int) -> Config:
  """The config a strategy is built from for generation: `batch` sequences, dropless, no dropout."""
  return dataclasses.replace(
    config,
    model=dataclasses.replace(config.model, dropless=True, expert_dropout=0.0),
    data=dataclasses.replace(config.data, batch_size=batch),
  )


def sample(
  logits: jax.Array, key: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
  """Next tokens [B] int32 from logits[B, V]: argmax at temperature 0, else a sample.

  top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the smallest set of most likely
  tokens whose probability reaches top_p (the nucleus). Both apply after the temperature.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    # The least likely logit still inside the nucleus (the most likely token always is).
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ConfigError for settings that cannot sample (one line, naming the values)."""
  if temperature < 0:
    raise ConfigError(f'temperature={temperature} must be >= 0 (0 is greedy)')
  if top_k < 0:
    raise ConfigError(f'top_k={top_k} must be >= 0 (0 keeps every token)')
  if not 0 < top_p <= 1:
    raise ConfigError(f'top_p={top_p} must be in (0, 1]')
  if temperature == 0 and (top_k > 0 or top_p < 1):
    raise ConfigError(
      f'top_k={top_k} / top_p={top_p} need sampling: greedy decoding (temperature=0) ignores '
      'them; pass a temperature > 0'
    )


@dataclasses.dataclass
class Result:
  """What `Generator.generate` returns; token lists exclude padding and the EOS that ended them."""

  tokens: list[list[int]]  # generated ids per prompt
  stopped_at_eos: list[bool]
  prefill_s: float  # prefill of the whole batch, first token sampled
  step_s: list[float]  # wall time of each decode step (one token for every running row)
  batch: int  # rows run, dummy padding included

  @property
  def tpot_s(self) -> float:
    """Median time per decode step (time per output token); nan with no decode step."""
    return statistics.median(self.step_s) if self.step_s else math.nan

  @property
  def generated(self) -> int:
    return sum(len(t) + eos for t, eos in zip(self.tokens, self.stopped_at_eos, strict=True))

  @property
  def tokens_per_s(self) -> float:
    """Generated tokens of the real prompts per second of prefill + decode."""
    return self.generated / (self.prefill_s + sum(self.step_s))


class Generator:
  """Generates from `params` (reference layout) under `config.parallel.strategy`.

  Args:
    config: the model's config (the strategy and its split come from config.parallel).
    params: parameters in the reference layout (e.g. restored from a train.py checkpoint).
    context: positions of the KV cache; every prompt plus its completion must fit in it.
    devices: devices of the strategy (default: all).
  """

  def __init__(self, config: Config, params: dict, context: int, devices: list | None = None):
    if context < 2:
      raise ConfigError(f'context={context} must be >= 2 (a prompt token and a new one)')
    self.config, self.context, self.devices = config, context, devices
    dtype = jnp.dtype(config.model.compute_dtype)
    # Decode reads every weight once per step: keep them in the compute dtype.
    self._params = jax.tree.map(lambda a: a.astype(dtype), params)
    self._programs: dict[tuple, tuple] = {}
    self.padded_batch(1)  # validates the strategy and its split before any prompt is seen

  def _strategy(self, batch: int):
    return strategies.get(decode_config(self.config, batch), self.devices)

  def padded_batch(self, n: int) -> int:
    """The smallest batch >= n the strategy can run; raises its ConfigError if none can."""
    first_error = None
    for b in range(n, n + _MAX_BATCH_PADDING):
      try:
        strategy = self._strategy(b)
      except ConfigError as e:
        first_error = first_error or e
        continue
      if b % strategy.decode_batch_multiple() == 0:
        return b
    raise first_error or ConfigError(f'no decode batch in [{n}, {n + _MAX_BATCH_PADDING})')

  def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raises ConfigError for prompts or lengths that cannot run, before any work."""
    if not prompts:
      raise ConfigError('no prompts given')
    if max_new_tokens < 1:
      raise ConfigError(f'max_new_tokens={max_new_tokens} must be >= 1')
    vocab = self.config.model.vocab_size
    for i, p in enumerate(prompts):
      if not p:
        raise ConfigError(f'prompt {i} is empty; every prompt needs at least one token')
      if len(p) > self.context:
        raise ConfigError(
          f'prompt {i} has {len(p)} tokens, longer than the cache context={self.context}'
        )
      if len(p) + max_new_tokens > self.context:
        raise ConfigError(
          f'prompt {i} ({len(p)} tokens) + max_new_tokens={max_new_tokens} = '
          f'{len(p) + max_new_tokens} overflows the cache context={self.context}'
        )
      if min(p) < 0 or max(p) >= vocab:
        raise ConfigError(f'prompt {i} has token ids outside [0, model.vocab_size={vocab})')

  def _compiled(self, batch: int, prompt_len: int, sampling: tuple):
    """AOT-compiled (strategy, prefill, step) for the batch and prompt length."""
    key = (batch, prompt_len, sampling)
    if 'cache' in self._programs.get(key, {}):
      return self._programs[key]
    strategy = self._strategy(batch)
    logging.info(
      'Generation memory per device (weights in %s, KV cache of %d positions):\n%s',
      self.config.model.compute_dtype,
      self.context,
      base.decode_memory_table(strategy.decode_memory_rows(self.context)),
    )
    params = jax.jit(strategy.from_reference)(self._params)
    params = jax.device_put(params, strategy.param_shardings(params))
    params, cache = strategy.prepare_decode(params, self.context)
    cache_sh = jax.tree.map(lambda a: a.sharding, cache)
    rep = strategy.replicated()

    # `seed` and `index` (int32 scalars) make the sampling key inside the program, so no key
    # op is dispatched (or compiled) between the timed calls.
    def prefill(params, cache, tokens, lengths, seed, index):
      key = jax.random.fold_in(jax.random.key(seed), index)
      logits, cache = strategy.forward_cached(params, cache, tokens, None)  # [B, P, V]
      last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
      return sample(last, key, *sampling), cache

    def step(params, cache, tokens, positions, seed, index):
      key = jax.random.fold_in(jax.random.key(seed), index)
      logits, cache = strategy.forward_cached(params, cache, tokens[:, None], positions)
      return sample(logits[:, 0], key, *sampling), cache

    start = time.perf_counter()
    abstract_cache = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), cache
    )
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
    shardings = dict(out_shardings=(rep, cache_sh), donate_argnums=1)
    prefill_c = (
      jax.jit(prefill, **shardings)
      .lower(params, abstract_cache, i32(batch, prompt_len), i32(batch), i32(), i32())
      .compile()
    )
    step_c = jax.jit(step, **shardings).lower(
      params, abstract_cache, i32(batch), i32(batch), i32(), i32()
    )
    step_c = step_c.compile()
    logging.info(
      'Compiled prefill and decode step for batch %d, prompt length %d in %.1f s.',
      batch,
      prompt_len,
      time.perf_counter() - start,
    )
    # The first run of a compiled program pays a one-off set-up (about 100x a tiny prefill on
    # CPU): one prefill and one step on dummy rows here, so that generate() times steady state.
    ones, zero = np.ones(batch, np.int32), np.int32(0)
    _, cache = prefill_c(params, cache, np.zeros((batch, prompt_len), np.int32), ones, zero, zero)
    _, cache = step_c(params, cache, ones, ones, zero, zero)
    jax.block_until_ready(cache)
    # The cache is reused by the next generation of this shape: entries past each sequence's
    # own position are never read, so it needs no clearing (and ma_sep's holds weights).
    self._programs[key] = {'params': params, 'prefill': prefill_c, 'step': step_c, 'cache': cache}
    return self._programs[key]

  def generate(
    self,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
  ) -> Result:
    """Completes every prompt (token ids); see the module docstring for the procedure."""
    check_sampling(temperature, top_k, top_p)
    self.check(prompts, max_new_tokens)
    n = len(prompts)
    batch = self.padded_batch(n)
    lengths = np.ones(batch, np.int32)
    lengths[:n] = [len(p) for p in prompts]
    tokens = np.zeros((batch, int(lengths.max())), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
    program = self._compiled(batch, tokens.shape[1], (temperature, top_k, top_p))
    params, prefill, step = program['params'], program['prefill'], program['step']
    cache = program.pop('cache')  # donated below; put back when the generation ends
    jax.block_until_ready(cache)

    start = time.perf_counter()
    seed = np.int32(seed)
    nxt, cache = prefill(params, cache, tokens, lengths, seed, np.int32(0))
    nxt = np.asarray(jax.device_get(nxt))
    prefill_s = time.perf_counter() - start

    out = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    eos = np.zeros(n, bool)
    step_s = []
    positions = lengths.copy()
    for i in range(max_new_tokens):
      for row in np.flatnonzero(~done):
        if eos_id is not None and nxt[row] == eos_id:
          done[row] = eos[row] = True
        else:
          out[row].append(int(nxt[row]))
          done[row] = len(out[row]) == max_new_tokens
      if done.all() or i == max_new_tokens - 1:
        break
      start = time.perf_counter()
      nxt, cache = step(params, cache, nxt, positions, seed, np.int32(i + 1))
      nxt = np.asarray(jax.device_get(nxt))
      step_s.append(time.perf_counter() - start)
      positions += 1
    program['cache'] = cache
    return Result(out, eos.tolist(), prefill_s, step_s, batch)
