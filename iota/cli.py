"""`iota`: the console command. Subcommands are added as the roles land."""

from __future__ import annotations

import json
from importlib.metadata import version

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


if __name__ == "__main__":
    app()
