"""The simulation lab: exact synthetic worlds where π_λ and every gain are computable, small policies trained by DPO
in them, primal-dual baselines, the parametric worlds of the correction round, and synthetic score tables.

Nothing here is needed to solve a dual; it is how the core's claims are checked against ground truth
(benchmarks/worlds_bench.py, benchmarks/refine_bench.py, benchmarks/coverage_bench.py).
"""
