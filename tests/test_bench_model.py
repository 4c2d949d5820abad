"""bench/model.py --quick --json: our whole model against transformers' Llama of the same shape."""

from __future__ import annotations

import pytest
import torch

from bench import model as model_bench
from common.model import get_preset
from tests.benches import run_bench

SHAPE_KEYS = ("vocab", "d_model", "layers", "heads", "kv_heads", "head_dim", "ffn", "rope_theta", "norm_eps")


@pytest.mark.timeout(120)
def test_model_bench_quick_json(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers", reason="the bench extra (pip install -e .[bench])")
    result = run_bench(model_bench, ["--quick", "--json"], capsys)  # it seeds the global generator

    cfg = get_preset("tiny")
    ours, hf = result["ours_shape"], result["hf_shape"]
    assert {k: ours[k] for k in SHAPE_KEYS} == {k: hf[k] for k in SHAPE_KEYS}
    assert (ours["vocab"], ours["d_model"], ours["layers"]) == (cfg.vocab_size, cfg.d_model, cfg.n_layers)
    assert (ours["heads"], ours["kv_heads"], ours["ffn"]) == (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden)
    assert ours["tied"] is False and hf["tied"] is False

    # The only parameters HF's Llama lacks: per stage boundary, the encoder's RMSNorm weight (d) and
    # projection (d x b), the decoder's projection (b x d), and the next stage's token embedding (tiny's
    # token_dim is d, so no projection).
    d, b = cfg.d_model, cfg.bottleneck_dim
    assert cfg.token_dim == d
    expected = (cfg.n_stages - 1) * (d + 2 * d * b + cfg.vocab_size * d)
    assert result["ours_params"] - result["hf_params"] == expected == result["bottleneck_params"]
    assert result["ours_params"] == 4_759_296  # docs/model.md's tiny count

    assert result["threads"] == 1 and result["device"] == "cpu" and result["dtype"] == "fp32"
    assert result["ours_step_s"] > 0 and result["hf_step_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_step_s"] / result["hf_step_s"], abs=1e-3)
    assert result["cpu_ratio"] > 0 and result["paired_ratio"] > 0 and result["paired_cpu_ratio"] > 0
    assert len(result["ours"]["times_s"]) == len(result["hf"]["times_s"]) == result["steps"]
    # Both start from random init on the same tokens: the loss is near ln(vocab) for each.
    for name in ("ours", "hf"):
        assert abs(result[name]["first_loss"] - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.5
