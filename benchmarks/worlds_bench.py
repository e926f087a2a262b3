"""One-shot CAN vs primal-dual in exact synthetic worlds (issue #3); the same run as `can bench`.

python benchmarks/worlds_bench.py            # full: m = 1, 2, 4, 8, 16 → benchmarks/results/worlds/
python benchmarks/worlds_bench.py --quick    # about a minute
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from train.bench import BenchConfig, run  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "worlds"))
    args = ap.parse_args()
    print(run(BenchConfig.quick() if args.quick else BenchConfig(), Path(args.out), progress=print))
