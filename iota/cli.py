"""`iota`: the console command. Subcommands are added as the roles land."""

from __future__ import annotations

import json
from enum import StrEnum
from importlib.metadata import version
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from common.model import PRESETS, get_preset, stage_sizes

app = typer.Typer(
    name="iota",
    help="IOTA: pretrain one LLM across many untrusted GPU machines, paid in Bittensor emissions.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

# fp32 weights (4) + fp32 gradients (4) + AdamW's two fp32 moments (8), per parameter.
TRAINING_BYTES_PER_PARAM = 16


@app.command("version")
def show_version() -> None:
    """Print the installed version."""
    console.print(version("iota-network"))


@app.command("presets")
def show_presets(
    preset: str = typer.Argument(None, help="Show only this preset."),
    bottleneck_ratio: int = typer.Option(None, help="Override d_model / b."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    markdown: bool = typer.Option(False, help="Print the table rows used in docs/model.md."),
) -> None:
    """Model presets: shape, stage split, and parameters per stage."""
    names = [preset] if preset else list(PRESETS)
    overrides = {"bottleneck_ratio": bottleneck_ratio} if bottleneck_ratio else {}
    rows = []
    for name in names:
        cfg = get_preset(name, **overrides)
        sizes = stage_sizes(cfg)
        rows.append(
            {
                "preset": name,
                "d_model": cfg.d_model,
                "blocks": cfg.n_layers,
                "vocab": cfg.vocab_size,
                "bottleneck_ratio": cfg.bottleneck_ratio,
                "bottleneck_dim": cfg.bottleneck_dim,
                "stage_blocks": list(cfg.stage_blocks),
                "stage_parameters": [s.parameters for s in sizes],
                "total_parameters": sum(s.parameters for s in sizes),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
    elif markdown:
        for r in rows:
            split = "/".join(map(str, r["stage_blocks"]))
            per_stage = " / ".join(f"{n:,}" for n in r["stage_parameters"])
            print(
                f"| `{r['preset']}` | {r['d_model']} | {r['blocks']} | {r['vocab']:,} | {split} | "
                f"{r['bottleneck_ratio']}x (b={r['bottleneck_dim']}) | {r['total_parameters']:,} | "
                f"{per_stage} |"
            )
    else:
        table = Table("preset", "d", "blocks", "split", "bottleneck", "total", "largest stage", "AdamW fp32")
        for r in rows:
            largest = max(r["stage_parameters"])
            table.add_row(
                r["preset"],
                str(r["d_model"]),
                str(r["blocks"]),
                "/".join(map(str, r["stage_blocks"])),
                f"{r['bottleneck_ratio']}x (b={r['bottleneck_dim']})",
                f"{r['total_parameters'] / 1e6:,.1f}M",
                f"{largest / 1e6:,.1f}M",
                f"{largest * TRAINING_BYTES_PER_PARAM / 2**30:,.1f} GiB",
            )
        console.print(table)


def _log_options(json_logs: bool, level: str | None, name: str) -> None:
    """Logging from IOTA_LOG_* (environment or .env); the command line's flags win."""
    from common.config import LogSettings
    from common.logs import setup_logging

    settings = LogSettings()
    setup_logging(json_lines=json_logs or settings.json, level=level or settings.level, name=name)


_JSON_LOGS = typer.Option(False, "--json-logs", help="One JSON object per log line (or IOTA_LOG_JSON=true).")
_LOG_LEVEL = typer.Option(
    None, "--log-level", help="DEBUG, INFO, WARNING or ERROR (default IOTA_LOG_LEVEL, INFO)."
)


@app.command("orchestrator")
def run_orchestrator(
    host: str = typer.Option(None, help="Listen address (default IOTA_ORCH_HOST, 127.0.0.1)."),
    port: int = typer.Option(None, help="Listen port (default IOTA_ORCH_PORT, 8000)."),
    json_logs: bool = _JSON_LOGS,
    log_level: str | None = _LOG_LEVEL,
) -> None:
    """Run the orchestrator: stage assignment, work routing through S3, the run's record."""
    from common.stopping import exit_now
    from orchestrator.run import RunMismatch
    from orchestrator.server import build_orchestrator, serve

    _log_options(json_logs, log_level, "orchestrator")
    try:
        orch = build_orchestrator()
    except (RunMismatch, ValueError) as error:
        console.print(f"[red]cannot start the orchestrator:[/red] {error}")
        raise typer.Exit(2) from None
    settings = orch.settings
    serve(orch, host or settings.host, settings.port if port is None else port)
    exit_now()  # stopped by itself: skip the interpreter's slow teardown (common.stopping)


@app.command("miner")
def run_miner(
    orchestrator_url: str = typer.Option(None, help="Orchestrator URL (IOTA_MINER_ORCHESTRATOR_URL)."),
    behavior: str = typer.Option(
        None, help="Deliberate misbehaviour for tests and the devnet (IOTA_MINER_BEHAVIOR); keep honest."
    ),
    json_logs: bool = _JSON_LOGS,
    log_level: str | None = _LOG_LEVEL,
) -> None:
    """Run a miner: train the stage the orchestrator assigns, on this machine's GPU (or CPU)."""
    from common.config import WalletSettings
    from common.keys import WalletError, load_hotkey
    from common.stopping import exit_now, stop_on_signals
    from miner.settings import MinerSettings
    from miner.worker import MinerWorker

    _log_options(json_logs, log_level, "miner")
    overrides = {"orchestrator_url": orchestrator_url, "behavior": behavior}
    settings = MinerSettings(**{k: v for k, v in overrides.items() if v is not None})
    try:
        keypair = load_hotkey(WalletSettings())
    except WalletError as error:
        console.print(f"[red]cannot start the miner:[/red] {error}")
        raise typer.Exit(2) from None
    MinerWorker(settings, keypair, stop=stop_on_signals("miner")).run()
    exit_now()  # stopped by itself: skip the interpreter's slow teardown (common.stopping)


@app.command("validator")
def run_validator(
    orchestrator_url: str = typer.Option(None, help="Orchestrator URL (IOTA_VALIDATOR_ORCHESTRATOR_URL)."),
    json_logs: bool = _JSON_LOGS,
    log_level: str | None = _LOG_LEVEL,
) -> None:
    """Run a validator: replay shadowed miners' work, score them with CLASP, and set weights."""
    from common.chain import ChainError, make_chain
    from common.config import ChainSettings, WalletSettings
    from common.keys import WalletError, load_hotkey
    from common.stopping import exit_now, stop_on_signals
    from validator.daemon import ValidatorDaemon
    from validator.settings import ValidatorSettings

    _log_options(json_logs, log_level, "validator")
    overrides = {"orchestrator_url": orchestrator_url}
    settings = ValidatorSettings(**{k: v for k, v in overrides.items() if v is not None})
    wallet = WalletSettings()
    try:
        keypair = load_hotkey(wallet)
        chain = make_chain(ChainSettings(), wallet)
    except (WalletError, ChainError) as error:
        console.print(f"[red]cannot start the validator:[/red] {error}")
        raise typer.Exit(2) from None
    ValidatorDaemon(settings, keypair, chain, stop=stop_on_signals("validator")).run()
    exit_now()  # stopped by itself: skip the interpreter's slow teardown (common.stopping)


_DEFAULT_SUMMARY = Path("devnet-summary.json")


@app.command("devnet")
def run_devnet_command(
    preset: str = typer.Option("tiny", help="Model preset."),
    stages: int = typer.Option(None, help="Split the preset's blocks into this many stages."),
    miners_per_stage: int = typer.Option(1, help="Honest miners per stage."),
    duration: float = typer.Option(None, "--duration", help="Seconds to train (default 120)."),
    samples: int = typer.Option(None, "--samples", help="Stop after this many samples instead."),
    batch_size: int = typer.Option(8, help="Sequences per sample."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    merge_every: int = typer.Option(64, help="Merge the replicas of each stage every N samples (0: never)."),
    validators: int = typer.Option(1, help="Validators replaying miners' work and setting weights."),
    adversaries: str = typer.Option(
        "", help="Extra misbehaving miners, e.g. `random-output:1,scaled-output:1,wrong-loss:1`."
    ),
    validation_fraction: float = typer.Option(
        0.25, min=0.0, max=1.0, help="Chance that a miner's epoch is replayed by a validator."
    ),
    burn: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of the weights set on the owner's uid 0."),
    summary: Path = typer.Option(_DEFAULT_SUMMARY, "--summary", help="Where to write the JSON."),
    workdir: Path = typer.Option(None, help="Keep state and logs here (default: a new temp folder)."),
    status_interval: float = typer.Option(
        10.0, min=0.1, help="Seconds between status lines when stdout is not a terminal (a log file, CI)."
    ),
    miner_device: str = typer.Option(
        "cpu",
        "--miner-device",
        help="Where the miners train (IOTA_MINER_DEVICE: cpu, cuda, cuda:N); `cuda` shares one GPU among "
        "them all. Validators replay on the CPU.",
    ),
    s3_endpoint: str = typer.Option(
        None,
        "--s3-endpoint",
        help="Use this S3 store instead of the embedded one; credentials, bucket and region come from "
        "IOTA_S3_* (the bucket is created if missing).",
    ),
) -> None:
    """Run the whole network on this machine: S3, chain, orchestrator, miners and validators, with live
    progress."""
    from contextlib import nullcontext

    from rich.live import Live

    from common.config import S3Settings
    from common.stopping import exit_now
    from common.storage import StorageError
    from iota.devnet import DevnetOptions, parse_adversaries, run_devnet, write_summary

    try:
        behaviors = parse_adversaries(adversaries)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--adversaries") from None

    options = DevnetOptions(
        preset=preset,
        stages=stages,
        miners_per_stage=miners_per_stage,
        batch_size=batch_size,
        seq_len=seq_len,
        merge_every=merge_every,
        duration_s=None if samples and duration is None else (duration or 120.0),
        samples=samples,
        workdir=workdir,
        behaviors=behaviors,
        validators=validators,
        validation_fraction=validation_fraction,
        burn_fraction=burn,
        s3=S3Settings(endpoint_url=s3_endpoint) if s3_endpoint else None,
        miner_device=miner_device,
    )
    # On a terminal one line updates in place; elsewhere (a log file, CI, nohup) Live would print nothing
    # until the end, so the same line is printed anew every `status_interval` seconds.
    live = Live(console=console, refresh_per_second=2, transient=False) if console.is_terminal else None
    if live is None:
        console.soft_wrap = True  # whole lines, as a log reader greps them: rich wraps at 80 columns off one
    console.print(
        f"[bold]iota devnet[/bold]: preset {preset}, {miners_per_stage} miner(s) per stage, "
        f"{len(behaviors)} adversaries, {validators} validator(s); starting S3, chain, orchestrator, miners "
        "and validators..."
    )
    printed_at = -status_interval

    def progress(status: Any, loss: float | None, elapsed: float) -> None:
        nonlocal printed_at
        tokens = status.samples_completed * status.batch_size * status.seq_len
        rate = tokens / elapsed if elapsed > 0 else 0.0
        loss_text = f"{loss:.3f}" if loss is not None else "-"
        line = (
            f"[{elapsed:5.0f} s] samples {status.samples_completed} done, {status.samples_in_flight} in "
            f"flight, {status.samples_dropped} dropped | {rate:,.0f} tokens/s | loss {loss_text} | epoch "
            f"{status.epoch} ({status.epoch_phase}), {status.merges_completed} stage merges"
        )
        if live is not None:
            live.update(line)
        elif elapsed - printed_at >= status_interval:
            printed_at = elapsed
            print(line, flush=True)

    def started(net: Any) -> None:
        console.print(
            f"dashboard: [bold]{net.url}/dashboard[/bold]  metrics and endpoints: {net.endpoints_path}"
        )

    try:
        with live or nullcontext():
            result = run_devnet(options, progress, on_start=started)
    except StorageError as error:  # the --s3-endpoint store refused us or could not be reached
        console.print(f"[red]cannot use the S3 store:[/red] {error}")
        raise typer.Exit(2) from None
    write_summary(result, summary)
    console.print(
        f"\ndone: {result['samples_completed']} samples, {result['tokens_per_s']:,.0f} tokens/s, loss "
        f"{result['loss_first']} -> {result['loss_last']}, {result['dropped_samples']} dropped, "
        f"{result['merges_completed']} stage merges. "
        f"Summary: {summary}  Logs: {result['workdir']}/logs"
    )
    if "weights" in result:
        table = Table("hotkey", "behavior", "weight")
        for hotkey, weight in sorted(result["weights"].items(), key=lambda kv: -kv[1]):
            behavior = "owner (burn)" if hotkey == result["owner"] else result["behaviors"].get(hotkey, "-")
            table.add_row(hotkey[:12], behavior, f"{weight:.4f}")
        console.print(table)
        v = result["validation"]
        unpaid = sorted({h for h in result["behaviors"] if h not in result["weights"]})
        console.print(
            f"replays: {v['replays']} judged, {v['tasks'].get('failed', 0)} failed "
            f"({len(v['replays_failed'])} miners), {v['false_positives']} false positives "
            f"(replay {v['replay_false_positives']}, CLASP {v['clasp_false_positives']}); "
            f"{len(unpaid)} miners unpaid"
        )
    if result["export"]:
        console.print(
            f"the merged model: {result['export']}; try "
            f"[bold]iota sample --checkpoint {result['export']} --prompt 'def '[/bold]"
        )
    # Every process of the network has stopped and the summary is written: skip the interpreter's teardown
    # of torch (seconds), which would otherwise run into the stop deadline after a Ctrl-C or SIGTERM.
    exit_now()


class ExportFormat(StrEnum):
    safetensors = "safetensors"  # one weights file and a JSON config, for `iota sample`
    hf = "hf"  # a transformers checkpoint directory (iota/hf_export.py)


@app.command("export")
def run_export(
    out: Path = typer.Option(
        ..., "--out", help="safetensors: the weights file (config goes to .json); hf: the directory."
    ),
    run_id: str = typer.Option(None, "--run", help="Run id (default: the one in the orchestrator's state)."),
    state: Path = typer.Option(None, "--state", help="Orchestrator state DB (default IOTA_ORCH_STATE_PATH)."),
    fmt: ExportFormat = typer.Option(
        ExportFormat.safetensors,
        "--format",
        help="safetensors (for iota sample) or hf (for transformers' AutoModelForCausalLM).",
    ),
) -> None:
    """Assemble the run's latest merged model from the bucket (IOTA_S3_*) into one safetensors file, or
    (--format hf) into a directory that transformers loads with trust_remote_code=True."""
    from common.config import S3Settings
    from common.storage import ObjectStore
    from iota.export import ExportError, export_model

    run_id = run_id or _run_id_from_state(state)
    try:
        store = ObjectStore.from_settings(S3Settings())
        if fmt is ExportFormat.hf:
            from iota.hf_export import export_hf

            info = export_hf(store, run_id, out)
        else:
            info = export_model(store, run_id, out)
    except ExportError as error:
        console.print(f"[red]cannot export:[/red] {error}")
        raise typer.Exit(2) from None
    wrote = f"{info.path}/" if fmt is ExportFormat.hf else f"{info.path} and {info.config_path}"
    console.print(
        f"wrote [bold]{wrote}[/bold]: run {info.run_id}, epoch {info.epoch}, {info.parameters:,} parameters"
    )
    table = Table("stage", "version")
    for stage, v in enumerate(info.versions):
        table.add_row(str(stage), f"{v}" if v else "0 (seeded init, never merged)")
    console.print(table)


def _run_id_from_state(state: Path | None) -> str:
    """The run id the orchestrator recorded, for running `iota export` beside it without looking it up."""
    from orchestrator.db import StateDB
    from orchestrator.settings import OrchestratorSettings

    path = state or OrchestratorSettings().state_path
    # StateDB would create a missing file; an empty new database is never what the user meant.
    if not path.is_file():
        console.print(f"[red]cannot export:[/red] no orchestrator state at {path}; pass --run or --state")
        raise typer.Exit(2)
    db = StateDB(path)
    try:
        run_id = db.get_meta("run_id")
    finally:
        db.close()
    if not run_id:
        console.print(f"[red]cannot export:[/red] {path} records no run id; pass --run RUN_ID")
        raise typer.Exit(2)
    return str(run_id)


@app.command("sample")
def run_sample(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A file written by `iota export`."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue (may be empty)."),
    max_new_tokens: int = typer.Option(100, min=0, help="Tokens to generate at most (stops early at EOS)."),
    temperature: float = typer.Option(0.8, min=0.0, help="Softmax temperature; 0 is greedy."),
    top_k: int = typer.Option(50, min=0, help="Sample among the k likeliest tokens; 0 keeps all."),
    seed: int = typer.Option(0, help="Sampling seed: the same seed gives the same text."),
) -> None:
    """Continue a prompt with an exported model, on the CPU."""
    from rich.text import Text

    from common.data import load_tokenizer
    from iota.export import ExportError, generate, load_exported

    try:
        model, config = load_exported(checkpoint)
    except ExportError as error:
        console.print(f"[red]cannot sample:[/red] {error}")
        raise typer.Exit(2) from None
    tokenizer = load_tokenizer(config["tokenizer"])
    text = generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    # Text, not a markup string: generated brackets print as they are; soft_wrap adds no line breaks.
    console.print(Text(prompt, style="dim") + Text(text), soft_wrap=True)


@app.command("check")
def run_check(
    role: str = typer.Argument(..., help="miner, validator or orchestrator."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Check what ROLE needs before it starts (settings, wallet, chain, orchestrator or S3, GPU); exits 1 at
    the first failure, saying what to do. The start scripts run it (IOTA_SKIP_CHECKS=1 skips it)."""
    from rich.text import Text

    from iota.preflight import CheckResult, Role, run_checks

    try:
        chosen = Role(role)
    except ValueError:
        raise typer.BadParameter("must be miner, validator or orchestrator", param_hint="ROLE") from None
    errors = Console(stderr=True)
    marks = {"ok": ("✓", "green"), "warn": ("✓", "yellow"), "skip": ("-", "dim"), "fail": ("✗", "red")}

    def show(result: CheckResult) -> None:
        mark, style = marks[result.status]
        line = Text(f"{mark} {result.name}: ", style=style) + Text(result.message)
        # soft_wrap: a long message stays one line in logs; failures go to stderr.
        (errors if result.fatal else console).print(line, soft_wrap=True)

    report = run_checks(chosen, None if as_json else show)
    if as_json:
        print(report.model_dump_json(indent=2))
    raise typer.Exit(0 if report.ok else 1)


if __name__ == "__main__":
    app()
