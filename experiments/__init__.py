"""Studies behind the figures in ``docs/``, outside the installed package.

Each module runs from the root of a checkout as ``python -m experiments.NAME``:
``pool_study`` (the Sampled-SAE pool's ceiling, dictionary and training traces),
``absorption_study`` (absorption's companion measures on the compare data),
``cofiring`` (per-token co-firing on a ``compare --activations`` run) and
``cli_timing`` (start-up time of the command).
"""
