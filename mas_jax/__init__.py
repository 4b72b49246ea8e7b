"""mas-jax: MA Separation (attention and experts of an MoE transformer on separate devices).

Modules: `config` (ConfigDict -> validated dataclasses), `model` (the Flax NNX reference model),
`layers` (per-device math), `mesh` (the MA Separation role mesh), `strategies` (reference, dp,
ma_sep, tp_pp, ep behind one interface), `data` (C4 / embedded sample / synthetic), `train_lib`
(the trainer), `metrics` (MFU, writers), `perf` (the analytic model of every strategy, the split
planner and the paper reproductions; pure Python).
"""
