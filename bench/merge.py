"""Merge traffic and time: bytes each miner moves in one stage's merge, against the stage's weight bytes.

For each n in `--ns` (default 2, 4, 8, 16), on one stage (default `tiny` stage 1):

1. n replicas: a `StageTrainer` per miner, all from the same seed, each wrapped in a `MergeParticipant`
   (its own `Traffic`, one shared `httpx.Client`) that loads the seeded init (`GlobalWeights` version 0)
   and snapshots it. Each then takes `--inner-steps` inner AdamW steps (default 1) on its own random input
   and output gradient (random tokens at the head, a random loss target's tokens at the tail), so every
   pseudo-gradient is real, non-zero and different. None of this is timed or counted.
2. The merge: `bench.merge_in_process.run_merge_in_process`, in one process, the orchestrator's state
   machine and its finalize step (`orchestrator.stage_merge`, `orchestrator.merge_finalize`) and the n
   participants (in a pool of min(8, n) threads); every transfer goes through real presigned URLs to an
   embedded S3 server (moto, on loopback). Timed as a whole (`wall_s`), and the orchestrator's finalize
   step in it (`orchestrator_s`). Each participant's `Traffic` is reset just before, so only the merge's
   transfers count.
3. Per miner traffic ratio = (bytes the miner uploaded + downloaded during the merge) / (stage weight
   bytes = stage parameters x 4, fp32). Mean and max over the n miners. Encoded objects carry the codec's
   header, so the measured ratio sits a little above the design's figure.

The design's figure, with n partitions each reduced by 2 of the n miners: upload the pseudo-gradient (1),
download the other miners' slices of the 2 partitions it reduces (2(n-1)/n), upload the 2 reduced partitions
(2/n), download the merged partitions it did not reduce (1 - 2/n): 4 - 2/n in all (3 at n = 2, 3.875 at
n = 16). For context: the reference network's merge moves about 4x the weights per miner, plus the outer
optimizer's state. The checkpoint a late or diverged miner downloads afterwards is not part of this figure.

Also recorded per n: the number of partitions, how many the orchestrator had to settle itself (0 when every
pair of reducers agreed bit for bit), flags, and whether every replica ended with the checkpoint's weights
digest (`replicas_identical`). The target is a mean ratio of at most 4.2 at every n.

    python bench/merge.py --json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench.merge_in_process import run_merge_in_process
from bench.report import emit
from common.model import get_preset
from common.model.config import ModelConfig
from common.protocol import GlobalWeights
from common.s3server import EmbeddedS3
from common.storage import ObjectStore
from common.training import StageTrainer
from miner.merge_participant import MergeParticipant, Traffic
from orchestrator.settings import OrchestratorSettings, training_spec
from orchestrator.stage_merge import REDUNDANCY

OUT_DIR = Path(__file__).resolve().parent / "out"
SEED = 1234
TARGET_RATIO = 4.2
# The orchestrator's defaults (`model_construct`: whatever this process's environment says).
RUN = OrchestratorSettings.model_construct()
TRAINING = training_spec(RUN)


def design_ratio(n: int) -> float:
    """Per miner bytes / weight bytes of this design: 1 + 2(n-1)/n + 2/n + (1 - 2/n)."""
    return 4 - 2 / n


def inner_step(trainer: StageTrainer, gen: torch.Generator, batch: int, seq: int) -> None:
    """One inner step on random input: tokens at the head, (B, T, b) activations elsewhere."""
    cfg = trainer.cfg
    if trainer.module.is_tail:
        x = torch.randn(batch, seq, cfg.bottleneck_dim, generator=gen)
        trainer.tail_step(x, torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen))
        trainer.commit()
        return
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    if trainer.module.is_head:
        out = trainer.forward("bench", tokens)
    else:
        out = trainer.forward("bench", torch.randn(batch, seq, cfg.bottleneck_dim, generator=gen), tokens)
    trainer.backward("bench", torch.randn(out.shape, generator=gen))
    trainer.commit()


def replicas(
    n: int, cfg: ModelConfig, stage: int, http: httpx.Client, args: argparse.Namespace
) -> dict[str, MergeParticipant]:
    """n participants from the seeded init, each a few inner steps away from it on its own data."""
    participants = {}
    for i in range(n):
        hotkey = f"5bench{i:02d}"
        trainer = StageTrainer(cfg, stage, TRAINING, seed=SEED, device="cpu")
        participant = MergeParticipant(trainer, TRAINING, hotkey=hotkey, http=http, traffic=Traffic())
        participant.load(GlobalWeights(version=0, seed=SEED))
        gen = torch.Generator().manual_seed(SEED * 1000 + i)
        for _ in range(args.inner_steps):
            inner_step(trainer, gen, args.batch_size, args.seq_len)
        assert trainer.steps - participant.steps_at_start == args.inner_steps
        participants[hotkey] = participant
    return participants


def measure(
    n: int, cfg: ModelConfig, stage: int, store: ObjectStore, http: httpx.Client, args: argparse.Namespace
) -> dict[str, Any]:
    participants = replicas(n, cfg, stage, http, args)
    for p in participants.values():
        p.traffic = Traffic()  # the merge's transfers only
    run_id = f"bench-n{n}"
    result = run_merge_in_process(
        participants,
        store=store,
        cfg=cfg,
        seed=SEED,
        stage=stage,
        epoch=0,
        accepted={h: args.inner_steps for h in participants},
        run_id=run_id,
        clip_factor=RUN.merge_clip_factor,
        threads=min(8, n),
    )
    state = result.merge.state
    numel = int(next(iter(participants.values())).start.numel())
    weight_bytes = numel * 4
    up = [p.traffic.uploaded / weight_bytes for p in participants.values()]
    down = [p.traffic.downloaded / weight_bytes for p in participants.values()]
    total = [u + d for u, d in zip(up, down, strict=True)]
    digest = state.checkpoint.digest if state.checkpoint is not None else None
    identical = (
        digest is not None
        and set(state.applied) == set(participants)
        and all(d == digest for d in state.applied.values())
    )
    store.delete(store.list_keys(f"runs/{run_id}/"))  # moto keeps objects in memory
    return {
        "participants": n,
        "phase": state.phase,
        "stage_parameters": numel,
        "weight_bytes": weight_bytes,
        "partitions": len(state.partitions),
        "settled": len(state.settled),
        "flagged": [f"{f.hotkey}: {f.reason}" for f in state.flagged],
        "replicas_identical": identical,
        "wall_s": round(result.wall_s, 4),
        "orchestrator_s": round(result.orchestrator_s, 4),
        "per_miner_traffic_ratio": round(sum(total) / n, 6),
        "per_miner_traffic_ratio_max": round(max(total), 6),
        "per_miner_upload_ratio": round(sum(up) / n, 6),
        "per_miner_download_ratio": round(sum(down) / n, 6),
        "design_ratio": round(design_ratio(n), 6),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.torch_threads)
    cfg = get_preset(args.preset)
    if not 0 <= args.stage < cfg.n_stages:
        raise SystemExit(f"{args.preset} has stages 0..{cfg.n_stages - 1}")
    ns = [int(s) for s in args.ns.split(",") if s.strip()]
    if not ns or min(ns) < 2:
        raise SystemExit("--ns needs participant counts of at least 2 (a partition has 2 reducers)")
    results: dict[str, Any] = {}
    with EmbeddedS3(port=0) as s3, httpx.Client(timeout=60.0) as http:
        store = ObjectStore.from_settings(s3.settings(bucket="bench-merge"))
        store.ensure_bucket()
        for n in ns:
            if not args.json:
                print(
                    f"n={n}: {n} replicas, {args.inner_steps} inner step(s) each, merging...", file=sys.stderr
                )
            results[str(n)] = measure(n, cfg, args.stage, store, http, args)
    return {
        "config": {
            "preset": args.preset,
            "stage": args.stage,
            "ns": ns,
            "seed": SEED,
            "inner_steps": args.inner_steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "redundancy": REDUNDANCY,
            "outer_lr": TRAINING.outer_lr,
            "outer_momentum": TRAINING.outer_momentum,
            "clip_factor": RUN.merge_clip_factor,
            "merge_threads": {str(n): min(8, n) for n in ns},
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count() or 1,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "s3": "embedded (moto) on loopback",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "results": results,
        "target": {"per_miner_traffic_ratio_max": TARGET_RATIO},
        "meets_target": all(r["per_miner_traffic_ratio"] <= TARGET_RATIO for r in results.values()),
    }


def print_table(r: dict[str, Any]) -> None:
    c = r["config"]
    first = next(iter(r["results"].values()))
    print(
        f"{c['preset']} stage {c['stage']}: {first['stage_parameters']:,} parameters "
        f"({first['weight_bytes'] / 2**20:.2f} MiB fp32), {c['inner_steps']} inner step(s) per replica, "
        f"{c['cpu_count']} CPUs, torch {c['torch']} ({c['torch_threads']} thread(s))"
    )
    header = (
        f"{'n':>3} {'parts':>5} {'settled':>7} {'wall s':>8} {'orch s':>7} {'ratio':>7} {'max':>7} "
        f"{'design':>7} {'up':>6} {'down':>6} {'identical':>9}"
    )
    print(header)
    for n, x in r["results"].items():
        print(
            f"{n:>3} {x['partitions']:>5} {x['settled']:>7} {x['wall_s']:>8.3f} {x['orchestrator_s']:>7.3f} "
            f"{x['per_miner_traffic_ratio']:>7.3f} {x['per_miner_traffic_ratio_max']:>7.3f} "
            f"{x['design_ratio']:>7.3f} {x['per_miner_upload_ratio']:>6.3f} "
            f"{x['per_miner_download_ratio']:>6.3f} {str(x['replicas_identical']).lower():>9}"
        )
        for flag in x["flagged"]:
            print(f"    flagged {flag}")
        if x["phase"] != "done":
            print(f"    the merge ended {x['phase']}")
    ok = "meets" if r["meets_target"] else "misses"
    print(f"ratio: per miner (up + down) / weight bytes, mean over miners; {ok} the target <= "
          f"{r['target']['per_miner_traffic_ratio_max']} at every n")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--ns", default="2,4,8,16", help="participant counts, comma separated")
    parser.add_argument("--inner-steps", type=int, default=1, help="inner steps per replica (at least 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of each inner step")
    parser.add_argument("--seq-len", type=int, default=32, help="sequence length of each inner step")
    # The merge's pool runs min(8, n) participants at once: one torch thread each keeps cores from thrashing.
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "merge.json", help="where to write the JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.inner_steps < 1:
        parser.error("--inner-steps must be at least 1: a replica with no steps is left out of the merge")

    emit(run(args), args.out, as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
