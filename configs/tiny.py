"""Tiny MoE transformer: trains on a CPU in minutes; the default of `python train.py`.

Run it (one CPU device, the reference strategy):
  python train.py --config=configs/tiny.py --workdir=/tmp/mas_jax/tiny

On 16 fake CPU devices with a parallel strategy:
  XLA_FLAGS=--xla_force_host_platform_device_count=16 python train.py \
    --config=configs/tiny.py --config.parallel.strategy=dp --workdir=/tmp/mas_jax/tiny_dp
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the tiny configuration."""
  config = ml_collections.ConfigDict()
  # Seed of parameter init, data shuffling and dropout.
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # Vocabulary size; with the embedded C4 sample a SentencePiece model of this size is trained.
  config.model.vocab_size = 512
  # Number of decoder blocks (each: attention + MoE FFN).
  config.model.num_layers = 2
  # Width of the residual stream.
  config.model.d_model = 64
  # Attention heads; head_dim = d_model // num_heads.
  config.model.num_heads = 8
  # Experts per MoE layer.
  config.model.num_experts = 16
  # Experts each token is routed to.
  config.model.top_k = 2
  # Hidden width of each expert FFN (d_model -> expert_hidden -> d_model).
  config.model.expert_hidden = 128
  # Expert FFN activation: 'gelu' (tanh approximation) or 'relu'.
  config.model.activation = 'gelu'
  # Dropout on the expert FFN hidden activations during training.
  config.model.expert_dropout = 0.1
  # Expert capacity = ceil(capacity_factor * tokens * top_k / num_experts); ignored when dropless.
  config.model.capacity_factor = 1.25
  # True: every routed token is computed (no capacity limit, nothing dropped).
  config.model.dropless = False
  # Coefficient of the Switch-style load-balancing loss.
  config.model.aux_loss_coef = 1e-2
  # Coefficient of the router z-loss (mean squared logsumexp of router logits).
  config.model.z_loss_coef = 1e-3
  # Dtype of matmuls and activations; parameters are always float32.
  config.model.compute_dtype = 'float32'
  # RoPE base frequency.
  config.model.rope_base = 10000.0
  # Attention kernel: 'auto' (JAX chooses), 'cudnn' (flash attention; GPU, bf16) or 'xla'.
  config.model.attention_impl = 'auto'
  # How a device holding all experts (strategies reference and dp) runs them: 'einsum' over
  # capacity buffers, or a grouped matmul over the routed rows: 'ragged_dot' (XLA) or
  # 'mosaic_gpu' (JAX's Hopper kernel). 'auto': einsum for capacity routing, a grouped matmul
  # when dropless (mosaic_gpu on an sm_90 GPU). Same routing and drops whichever runs.
  config.model.expert_impl = 'auto'
  # Rematerialisation of each block in the backward pass: 'none', 'full' (recompute the block)
  # or 'save_dots' (keep matmul outputs, recompute the rest).
  config.model.remat = 'none'
  # Output head + cross entropy over chunks of this many tokens (0: all at once): each chunk's
  # float32 logits [chunk, vocab_size] are made, used for the loss and its gradients in the
  # forward pass (a custom VJP), and dropped, so [tokens, vocab_size] never exists whole.
  config.model.loss_chunk = 0

  config.data = ml_collections.ConfigDict()
  # 'c4': TFDS C4 (the embedded sample when data_dir holds no prepared C4); 'synthetic': random.
  config.data.source = 'c4'
  # TFDS dataset name and version of prepared C4 ('c4/en' with '3.1.0' or '3.0.1').
  config.data.dataset = 'c4/en'
  config.data.version = '3.1.0'
  # TFDS data_dir; empty means ~/.cache/mas_jax/tfds, where the embedded sample is built.
  config.data.data_dir = ''
  # SentencePiece model; empty means the one trained for the embedded sample.
  config.data.tokenizer_path = ''
  # Tokens per training sequence (each row holds seq_len + 1 tokens: inputs and shifted targets).
  config.data.seq_len = 64
  # Global batch size in sequences.
  config.data.batch_size = 16
  # Documents in the shuffle buffer.
  config.data.shuffle_buffer = 1000
  # Batches prepared ahead of the train step.
  config.data.prefetch = 2
  # TFDS split names for training and evaluation.
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'

  config.train = ml_collections.ConfigDict()
  # Optimizer steps.
  config.train.steps = 300
  # Peak learning rate, reached after warmup_steps of linear warmup (clamped to steps - 1),
  # then cosine decay to end_lr_ratio * peak at the last step.
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 30
  # Final learning rate as a fraction of the peak.
  config.train.end_lr_ratio = 0.1
  # AdamW moments, epsilon and decoupled weight decay (norm scales and biases are not decayed).
  config.train.b1 = 0.9
  config.train.b2 = 0.95
  config.train.eps = 1e-8
  config.train.weight_decay = 0.1
  # Micro-batches whose gradients are accumulated before each optimizer step (the strategy sees
  # batch_size / grad_accum_steps sequences at a time).
  config.train.grad_accum_steps = 1
  # Global-norm gradient clipping threshold.
  config.train.grad_clip = 1.0
  # Steps between metric lines (metrics.jsonl, TensorBoard, log).
  config.train.log_every = 10
  # Steps between evaluations, and batches per evaluation.
  config.train.eval_every = 100
  config.train.eval_steps = 4
  # Steps between checkpoints, and checkpoints kept.
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 2
  # A step whose loss or gradient norm is NaN/inf stops the run (exit code 1) before anything
  # newer than the last finite step is saved. N > 0: skip up to N such steps instead (their
  # update is dropped by optax.apply_if_finite); the N+1-th stops the run.
  config.train.skip_nonfinite_steps = 0
  # TensorBoard summaries in <workdir>/tensorboard (importing TensorFlow for them takes ~4 s).
  config.train.tensorboard = True
  # Dtype of AdamW's first moment: 'float32' or 'bfloat16' (optax.adamw(mu_dtype=...); optax
  # has no such option for the second moment, which stays float32). bfloat16 saves 2 of the
  # 12 bytes of train state per parameter and 4 of AdamW's 28 bytes of HBM traffic.
  config.train.mu_dtype = 'float32'
  # One device, grad_accum_steps > 1, one layer, 'reference', einsum experts: the expert
  # weight-gradient GEMMs add into the float32 gradient accumulator themselves (cuBLAS beta = 1)
  # instead of writing bfloat16 gradients that a separate pass adds (bench/grad_accum_fusion.py;
  # at more layers the layer scan's slices of the accumulator undo the fusion, so it is refused).
  # The expert gradients are then summed unrounded: the step is not bit-equal to False's.
  config.train.fuse_grad_accum = False

  config.parallel = ml_collections.ConfigDict()
  # Strategy name from mas_jax.strategies: 'reference' (one device) or 'dp' (all devices).
  config.parallel.strategy = 'reference'
  # MA Separation: attention and expert devices (attn_devices + moe_devices == device count).
  # 'auto' (ma_sep only; either or both): train.py asks the planner (mas_jax.perf) for the
  # fastest valid split of the device count for this model and batch on `hardware`, logs the
  # top three with the reason, and records the numbers it chose in the run's config.json.
  # Declared with field_type=object so that a flag can give either an integer or 'auto'.
  config.parallel.attn_devices = ml_collections.FieldReference(12, field_type=object)
  config.parallel.moe_devices = ml_collections.FieldReference(4, field_type=object)
  # Micro-batches per step (co-execution / pipelining); must divide batch_size. 'auto' (ma_sep
  # only): the planner's best M for the split; a number given here is held fixed while an
  # 'auto' split is chosen (the planner then ranks the splits at that M).
  config.parallel.num_microbatches = ml_collections.FieldReference(1, field_type=object)
  # What the planner models for the 'auto' fields: 'auto' is the GPU's preset (h100, h200,
  # a100, ...) with docs/benchmarks/<device>_calibration.json when present, the datasheet
  # otherwise, and h100 where the device kind names no preset (CPU); or a preset name of
  # mas_jax.perf.HARDWARE, or a JSON file of figures ({"base": "h100", "hbm_bw": ...}).
  config.parallel.hardware = 'auto'
  # MA Separation: reduce attention outputs inside a row first, then across rows.
  config.parallel.hierarchical_allreduce = False
  # MA Separation MoE dispatch: 'all_to_all' (each expert device routes its share of the
  # sequences, all_to_all inside the expert row, ppermute back to attention rows), 'replicated'
  # (each expert device routes every token, psum back), or 'auto' (all_to_all when the expert
  # devices form one mesh row and the micro-batch divides over them).
  config.parallel.moe_dispatch = 'auto'
  # MA Separation's attention group: 'heads' (the seed's: attention device i holds heads
  # [i*N/A, (i+1)*N/A) of every layer, its partial outputs are psum-ed) or 'batch' (data
  # parallel, as in MegaScale-Infer: every attention device holds all heads and runs its
  # floor/ceil share of each micro-batch's sequences; the outputs are all_gathered, and the
  # attention weights' gradients all-reduced like any replicated parameter's).
  config.parallel.attn_sharding = 'heads'
  # MA Separation's dynamic expert re-placement: every N steps (0: never) the experts' routed
  # loads summed since the last re-placement choose a new expert -> slot table (greedy
  # longest-processing-time: the busiest expert device's load as low as it gets), and the expert
  # weights and their AdamW moments move to their new slots (mas_jax/rebalance.py). The table is
  # an input of the train step (nothing recompiles) and is checkpointed.
  config.parallel.rebalance_every = 0
  # Hybrid tensor x pipeline parallelism: tp * pp == device count.
  config.parallel.tp = 8
  config.parallel.pp = 2
  # tp_pp's pipeline schedule: 'gpipe' (autodiff of the forward ticks: every stage keeps all
  # M micro-batches' activations) or '1f1b' (one forward or backward per tick, at most pp
  # micro-batches' stage inputs live per stage, the forward recomputed in the backward).
  config.parallel.pp_schedule = 'gpipe'
  # Expert parallelism degree (the rest of the devices is data parallel).
  config.parallel.ep = 16
  # ZeRO-style optimizer sharding, any strategy: the fp32 master weights and AdamW moments are
  # held in the reference layout split over all devices, gradients are reduce-scattered into
  # them, and each step all-gathers compute-dtype copies to the devices that read them.
  config.parallel.shard_optimizer = False
  # With shard_optimizer and accumulation: True moves each chunk's gradients into the sharded
  # float32 accumulator (ZeRO-2, least memory); False sums them in the compute layout and moves
  # them once per step (ZeRO-1: fewer bytes, one float32 gradient buffer of the strategy layout).
  config.parallel.shard_gradients = True
  # Gradient all-reduce of the parameters every device holds whole (all of them under dp; the
  # embedding, head, norms, router and, under ep, attention elsewhere): 'none' (psum) or 'topk'
  # (each device sends the topk_fraction of entries of largest magnitude of its gradient plus
  # the residual it kept from before, as (index, value) pairs: error feedback).
  config.parallel.grad_compression = 'none'
  config.parallel.topk_fraction = 0.01
  return config
