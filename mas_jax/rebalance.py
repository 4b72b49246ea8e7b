"""Dynamic expert re-placement for `ma_sep` (`parallel.rebalance_every`).

The train state holds `placement`, an int32 table [E] giving the expert slot of every expert
(slot s lives on expert device s // E_loc; the identity at the start), and `expert_load`, the
experts' routed-load fractions (the `expert_load` metric) summed over the steps since the last
re-placement. Every `rebalance_every` steps the training loop:
  1. reads the summed loads (one [E] transfer);
  2. chooses a new table with `lpt_placement`: greedy longest-processing-time over the expert
     devices, each with E_loc slots (heaviest expert first, to the least loaded device with a
     free slot), to make the busiest expert device's routed tokens low;
  3. if the table changed, moves every expert's weights and AdamW moments to their new slots
     (`move_state`: `MASeparation.move_experts`, ppermutes between the expert devices in
     which each sends and receives at most its own slots; with parallel.shard_optimizer the
     master is in the reference layout and nothing moves: the next step's compute copy is
     gathered by the new table);
  4. zeroes the summed loads.
The table is an input of the compiled train and eval steps, so nothing recompiles, and it is
checkpointed with the state. The strategy routes expert e to slot placement[e] and draws expert
dropout by expert id, so losses and gradients are those of the reference whatever the table
(tests/test_rebalance.py).

What moves is the routed load per device. ma_sep's expert FFN runs on per-expert capacity
buffers, whose size does not depend on the load (and a slot's queue is its expert's, so the same
tokens are dropped): on these kernels no step gets faster. The gain is the step time of a kernel
that computes what is routed (a grouped matmul, as dropless routing and decode use elsewhere),
which the planner predicts from the load fractions and the table (`predicted_steps`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging

from mas_jax import zero
from mas_jax.perf import model as perf_model


def device_loads(loads: np.ndarray, placement: np.ndarray, per_device: int) -> np.ndarray:
  """[n_moe] routed load of each expert device: the loads of the experts in its slots."""
  out = np.zeros(len(loads) // per_device)
  np.add.at(out, np.asarray(placement) // per_device, loads)
  return out


def lpt_placement(loads: np.ndarray, per_device: int) -> np.ndarray:
  """The expert -> slot table [E] int32 of greedy longest-processing-time
  (`mas_jax.perf.model.lpt_placement`, which the planner uses too). Deterministic, so every
  process computes the same table."""
  loads = [float(x) for x in np.asarray(loads, np.float64)]
  return np.asarray(perf_model.lpt_placement(loads, per_device), np.int32)


def move_state(layout: zero.ParamLayout, state: dict, placement: jax.Array) -> dict:
  """The train state with its experts (parameters and every parameter-shaped part of the
  optimizer state) moved from `state['placement']`'s slots to `placement`'s, the new table
  stored and the summed loads zeroed. Traceable; jit it with the state's shardings."""
  old = state['placement']
  params_def = jax.tree.structure(layout.abstract())

  def move(tree):
    return layout.move_experts(tree, old, placement)

  def is_params(x):
    return jax.tree.structure(x) == params_def

  out = jax.tree.map(lambda x: move(x) if is_params(x) else x, state, is_leaf=is_params)
  out['placement'] = placement
  out['expert_load'] = jax.numpy.zeros_like(state['expert_load'])
  return out


class Rebalancer:
  """The training loop's re-placement: `maybe_rebalance(step, state)` every N steps."""

  def __init__(self, layout: zero.ParamLayout, shardings: dict):
    self.every = layout.config.parallel.rebalance_every
    if not self.every:
      return
    self.per_device = layout.strategy.layout.local_experts
    self._move = jax.jit(
      lambda state, placement: move_state(layout, state, placement),
      in_shardings=(shardings, layout.strategy.replicated()),
      out_shardings=shardings,
      donate_argnums=0,
    )

  def maybe_rebalance(self, step: int, state: dict) -> tuple[dict, dict[str, float]]:
    """(state, metrics to log): re-placed at multiples of `every` where the table changes."""
    if not self.every or step % self.every:
      return state, {}
    loads, old = jax.device_get((state['expert_load'], state['placement']))
    new = lpt_placement(loads, self.per_device)
    before = device_loads(loads, old, self.per_device)
    after = device_loads(loads, new, self.per_device)
    total = max(float(loads.sum()), 1e-30)
    metrics = {
      'busiest_expert_device_load_before': float(before.max()) / total,
      'busiest_expert_device_load_after': float(after.max()) / total,
    }
    if after.max() >= before.max():  # no better table: keep the slots, restart the window
      logging.info(
        'step %d: expert re-placement: the busiest expert device routed %.1f%% of the last %d '
        "steps' tokens; no table does better, kept",
        step,
        100 * metrics['busiest_expert_device_load_before'],
        self.every,
      )
      state = dict(state)
      state['expert_load'] = jax.numpy.zeros_like(state['expert_load'])
      return state, metrics
    logging.info(
      'step %d: expert re-placement: the busiest expert device routed %.1f%% of the last %d '
      "steps' tokens, %.1f%% under the new expert -> slot table %s",
      step,
      100 * metrics['busiest_expert_device_load_before'],
      self.every,
      100 * metrics['busiest_expert_device_load_after'],
      new.tolist(),
    )
    return self._move(state, jax.numpy.asarray(new, jax.numpy.int32)), metrics


def predicted_steps(m, hw, w, split, loads, cal=None) -> tuple[float, float]:
  """The planner's ma_sep step time (s) under `loads` (routed-load fractions per expert) with
  experts in their initial slots and with the LPT table, for a kernel that computes what is
  routed (dropless): (before, after)."""
  from mas_jax.perf import ma_sep as ma_sep_model

  spec = dataclasses.replace(m, dropless=True, expert_loads=tuple(float(x) for x in loads))
  before = ma_sep_model.predict(spec, hw, w, split, cal).step_s
  after = ma_sep_model.predict(dataclasses.replace(spec, rebalanced=True), hw, w, split, cal)
  return before, after.step_s
