"""What validation costs and what it catches.

1. Replay cost: for each stage of the tiny preset, a miner's honest epoch simulated in-process
   (`bench/replay_sim.py`), then replayed by `validator.replay` on the same CPU and thread count: the
   validator's compute per validated miner-epoch relative to the miner's own compute for it. With a
   fraction p of epochs shadowed, the network spends p times that ratio on validation.
2. CLASP: detection rate and false-positive rate against the number of loss records, for a stage-1
   miner that corrupts a fraction of its outputs, on losses of the real tiny model (`bench/clasp_sim.py`).

    python bench/validation.py            # tables
    python bench/validation.py --json     # JSON (also written to bench/out/validation.json)
    python bench/validation.py --quick    # a smaller run (what the test runs)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench import clasp_sim
from bench.replay_sim import STAGE_NAMES, replay_cost
from bench.report import emit
from orchestrator.settings import OrchestratorSettings

OUT = Path(__file__).resolve().parent / "out" / "validation.json"
VALIDATION_FRACTION = OrchestratorSettings.model_fields["validation_fraction"].default


def measure_replay_cost(samples: int, repeats: int, threads: int) -> dict[str, Any]:
    stages = [replay_cost(stage, samples, repeats, threads=threads) for stage in STAGE_NAMES]
    mean_ratio = statistics.fmean(s["ratio"] for s in stages)
    return {
        "stages": [{**s, "stage_name": STAGE_NAMES[s["stage"]]} for s in stages],
        "mean_ratio": mean_ratio,
        "validation_fraction": VALIDATION_FRACTION,
        # validator compute per unit of miner compute over the whole network, at the default fraction
        "network_share": VALIDATION_FRACTION * mean_ratio,
    }


def run(*, quick: bool, samples: int, repeats: int, threads: int, trials: int) -> dict[str, Any]:
    began = time.perf_counter()
    cost = measure_replay_cost(samples, repeats, threads)
    if quick:
        # The full run's 200-step model (a smaller pool of its samples): after 40 steps random outputs cost
        # from 0.06 to 1.1 nats depending on the seed and the CPU's kernels, too little to catch reliably.
        pool = clasp_sim.loss_pool(steps=200, pool=96)
        clasp = clasp_sim.detection_table(
            sizes=(128, 512, 2048), fractions=(1.0, 0.25), behaviors=("random-output",),
            miners_per_stage=(2,), trials=trials, pool=pool,
        )  # fmt: skip
    else:
        clasp = clasp_sim.detection_table(trials=trials, pool=clasp_sim.loss_pool())
    return {
        "quick": quick,
        "replay_cost": cost,
        "clasp": clasp,
        "clasp_records_needed": clasp_sim.records_needed(clasp),
        "elapsed_s": time.perf_counter() - began,
    }


def print_table(result: dict[str, Any]) -> None:
    cost = result["replay_cost"]
    print("Replay cost per validated miner-epoch (honest fp32 work, same CPU, tiny preset):")
    print(f"{'stage':<8}{'ops':>6}{'miner compute s':>18}{'replay s':>11}{'ratio':>8}")
    for s in cost["stages"]:
        print(
            f"{s['stage_name']:<8}{s['ops']:>6}{s['miner_compute_s']:>18.3f}{s['replay_s']:>11.3f}{s['ratio']:>8.2f}"
        )
    print(
        f"mean ratio {cost['mean_ratio']:.2f}; at validation_fraction {cost['validation_fraction']},"
        f" validators spend {cost['network_share']:.2f}x of the miners' compute\n"
    )
    clasp_sim.print_table(result["clasp"])
    print(f"\n{result['elapsed_s']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    parser.add_argument("--quick", action="store_true", help="A small run: fewer samples, trials and cells.")
    parser.add_argument("--samples", type=int, default=None, help="Samples per replayed epoch (32; quick 8).")
    parser.add_argument(
        "--repeats", type=int, default=None, help="Epochs per stage, fastest kept (3; quick 1)."
    )
    parser.add_argument("--trials", type=int, default=None, help="CLASP trials per cell (30; quick 10).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads for the miner and the replay.")
    parser.add_argument("--out", type=Path, default=OUT, help="Where the JSON goes.")
    args = parser.parse_args(argv)
    result = run(
        quick=args.quick,
        samples=args.samples or (8 if args.quick else 32),
        repeats=args.repeats or (1 if args.quick else 3),
        threads=args.threads,
        trials=args.trials or (10 if args.quick else 30),
    )
    emit(result, args.out, as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
