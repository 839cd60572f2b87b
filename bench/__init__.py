"""Side-by-side benchmark of RoPE implementations on the project's workloads: `python -m bench`.

Nothing is imported here, so that `python -m bench.cold_start` starts from a bare interpreter.
"""
