"""`python -m mas_jax.perf`: the planner's command line (see mas_jax/perf/cli.py)."""

from mas_jax.perf import cli

if __name__ == '__main__':
  cli.run()
