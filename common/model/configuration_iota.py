"""The model's shape as a transformers `PretrainedConfig`, for `iota export --format hf`.

It wraps `ModelConfig` rather than restating its fields: `iota_model` is the `ModelConfig.to_dict()` the run
recorded, checked by `ModelConfig.from_dict`, and the attributes that tools read by their usual names
(`hidden_size`, `num_hidden_layers`, ...) are derived from it. Needs transformers; nothing in the product
imports this module except the export, and the export copies it into the exported directory verbatim.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .config import ModelConfig


class IotaConfig(PretrainedConfig):
    """`iota_model`: `ModelConfig.to_dict()`; `seed`: the run's init seed; `iota_run`: what the export knows
    of the run (run id, epoch, per-stage versions, data), kept so the directory says where it came from."""

    model_type = "iota"

    def __init__(
        self,
        iota_model: dict[str, Any] | None = None,
        seed: int = 0,
        iota_run: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The HF defaults: no tied embeddings (the LM head is its own matrix), fp32 as trained.
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("dtype", "float32")
        # Derived below; drop the copies a saved config.json carries so that iota_model alone decides.
        for name in _DERIVED:
            kwargs.pop(name, None)
        super().__init__(**kwargs)
        self.iota_model = iota_model
        self.seed = seed
        self.iota_run = iota_run
        if iota_model is not None:
            cfg = self.model_config
            self.vocab_size = cfg.vocab_size
            self.hidden_size = cfg.d_model
            self.intermediate_size = cfg.ffn_hidden
            self.num_hidden_layers = cfg.n_layers
            self.num_attention_heads = cfg.n_heads
            self.num_key_value_heads = cfg.n_kv_heads
            self.head_dim = cfg.head_dim
            self.max_position_embeddings = cfg.max_seq_len

    @property
    def model_config(self) -> ModelConfig:
        if self.iota_model is None:
            raise ValueError("this IotaConfig has no iota_model (a ModelConfig.to_dict())")
        return ModelConfig.from_dict(self.iota_model)


_DERIVED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
