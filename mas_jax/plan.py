"""`python -m mas_jax.plan`: an alias of `python -m mas_jax.perf` (mas_jax/perf/cli.py)."""

from mas_jax.perf import cli

if __name__ == '__main__':
  cli.run()
