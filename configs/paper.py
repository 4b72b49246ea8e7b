"""The seed paper's model and placement: 4-layer MoE transformer, MA Separation 12:4 on 16 GPUs.

d_model 4096, 32 heads of 128, seq 2048, 16 experts per layer, top-2, expert hidden 16384, GELU,
expert dropout 0.1, 1024 sequences per batch, AdamW, 50K steps. It needs 16 GPUs:
  python train.py --config=configs/paper.py --config.data.source=synthetic \
    --workdir=/tmp/mas_jax/paper
On real prepared C4, drop the `source` override and point `--config.data.data_dir` at it and
`--config.data.tokenizer_path` at the T5 C4 SentencePiece model (vocabulary 32000).
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  """Returns the seed configuration (the tiny config's fields, with the paper's values)."""
  config = tiny.get_config()
  config.model.vocab_size = 32000
  config.model.num_layers = 4
  config.model.d_model = 4096
  config.model.num_heads = 32
  config.model.num_experts = 16
  config.model.top_k = 2
  config.model.expert_hidden = 16384
  config.model.activation = 'gelu'
  config.model.expert_dropout = 0.1
  config.model.compute_dtype = 'bfloat16'

  config.data.seq_len = 2048
  config.data.batch_size = 1024
  config.data.shuffle_buffer = 10_000

  config.train.steps = 50_000
  config.train.learning_rate = 3e-4
  config.train.warmup_steps = 2000
  config.train.log_every = 50
  config.train.eval_every = 2000
  config.train.eval_steps = 20
  config.train.checkpoint_every = 2000
  config.train.keep_checkpoints = 3

  config.parallel.strategy = 'ma_sep'
  # The seed's split. --config.parallel.attn_devices=auto --config.parallel.moe_devices=auto
  # lets the planner choose instead (at M=4 unless num_microbatches=auto too; configs/tiny.py).
  config.parallel.attn_devices = 12
  config.parallel.moe_devices = 4
  config.parallel.num_microbatches = 4
  return config
