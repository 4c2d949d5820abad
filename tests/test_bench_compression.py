"""bench/compression.py: the quick sweep's JSON, the real codec on the wire both ways, and "none" without a
bottleneck."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import compression
from common.model import IotaModel, get_preset
from tests.benches import run_bench


def test_quick_sweep_reports_every_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compression.json"
    result = run_bench(compression, ["--quick", "--json", "--out", str(out)], capsys)
    assert json.loads(out.read_text()) == result
    settings = result["settings"]
    assert list(settings) == list(compression.ALL_SETTINGS)
    assert {"none", "none-int8", "128x", "128x-int8", "256x", "256x-int8"} <= settings.keys()
    for key, r in settings.items():
        for name in ("final_train_loss", "heldout_loss", "heldout_gap_pct", "step_s"):
            assert isinstance(r[name], float) and math.isfinite(r[name]), (key, name, r[name])
        assert r["fwd_bytes_per_hop"] > 0 and r["bwd_bytes_per_hop"] > 0
    assert settings["none"]["heldout_gap_pct"] == 0.0
    assert settings["none"]["b"] == get_preset("tiny").d_model and settings["128x"]["b"] == 2
    # int8 payloads are a quarter of fp32 plus one scale per row: smaller wherever rows are wide.
    assert settings["none-int8"]["fwd_bytes_per_hop"] < settings["none"]["fwd_bytes_per_hop"] / 3
    assert settings["32x-int8"]["bwd_bytes_per_hop"] < settings["32x"]["bwd_bytes_per_hop"]


@pytest.mark.parametrize("int8", [False, True])
def test_the_hop_round_trips_activation_and_gradient_through_the_codec(int8: bool) -> None:
    cfg = get_preset("tiny", bottleneck_ratio=32)
    wire = compression.make_wire(cfg, 2, 16, int8)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, cfg.bottleneck_dim, generator=generator, requires_grad=True)
    grad = torch.randn(2, 16, cfg.bottleneck_dim, generator=generator) * 1e-4  # gradient-sized values
    meter = compression.Meter()
    y = compression.WireHop.apply(x, wire, meter)
    y.backward(grad)
    assert x.grad is not None and len(meter.fwd_bytes) == len(meter.bwd_bytes) == 1
    for sent, received in ((x.detach(), y.detach()), (grad, x.grad)):
        if not int8:
            assert torch.equal(sent, received)
            continue
        # Really quantised: not equal, yet within half a step of the per-row int8 scale.
        assert not torch.equal(sent, received)
        step = sent.abs().amax(dim=-1, keepdim=True) / 127
        assert ((sent - received).abs() <= step / 2 + 1e-6 * step).all()
    elements = x.numel()
    if int8:  # int8 values plus an fp32 scale per row, under the fp32 payload's 4 bytes per value
        assert meter.fwd_bytes[0] < elements * 4 and meter.bwd_bytes[0] < elements * 4
    else:
        assert meter.fwd_bytes[0] > elements * 4


def test_none_has_no_bottleneck() -> None:
    cfg = get_preset("tiny", bottleneck_ratio=1)
    assert compression.parse_setting("none") == (1, False)
    assert not cfg.has_bottleneck and cfg.bottleneck_dim == cfg.d_model
    assert get_preset("tiny").has_bottleneck
    model = IotaModel(cfg, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert not any(".encoder." in n or ".decoder." in n for n in names)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    head = model.stages[0]
    with torch.no_grad():
        h = head.embed(tokens)
        for block in head.blocks:
            h = block(h, head.rope_cos[:16], head.rope_sin[:16])
        # The whole residual stream crosses, as it is.
        assert torch.equal(head(tokens), h)
        assert model(tokens).shape == (2, 16, cfg.vocab_size)
