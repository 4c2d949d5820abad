"""`IotaModel` behind transformers' `PreTrainedModel` and `GenerationMixin`, for `iota export --format hf`.

A thin wrapper: the architecture is `stages.py` (bottlenecks and stage token embeddings included), imported
relatively, so the export copies this module and everything it imports from this package verbatim into the
exported directory, and `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` runs exactly
that code. The weights are `IotaModel`'s state dict under `model.`. No KV cache: the stages have none, so
`generate` recomputes the whole context at each step, as `iota sample` does.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput

from .configuration_iota import IotaConfig
from .layers import rotary_tables
from .stages import IotaModel, PipelineStage, next_token_loss


class IotaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = IotaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["PipelineStage"]
    _supports_sdpa = True

    def __init__(self, config: IotaConfig) -> None:
        super().__init__(config)
        # transformers builds the model on the meta device before loading a checkpoint; the seeded init would
        # be wasted there (and cannot run on meta), so build shapes only and let the checkpoint fill them.
        meta = torch.empty(()).device.type == "meta"
        self.model = IotaModel(config.model_config, seed=config.seed, device="meta" if meta else "cpu")
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Only the rotary tables: they are buffers the checkpoint does not carry. Parameters come from the
        # checkpoint, or from IotaModel's seeded init when the model is built fresh from a config.
        if isinstance(module, PipelineStage):
            cfg = module.cfg
            cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            init.copy_(module.rope_cos, cos)
            init.copy_(module.rope_sin, sin)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.stages[0].embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.stages[-1].lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """Logits (B, T, vocab); with `labels` (shifted inside, -100 ignored) also the next-token loss."""
        # The model attends causally over every position; padding would silently change the results.
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("IotaForCausalLM does not support padding: pass unpadded sequences")
        logits = self.model(input_ids)
        loss = next_token_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits)
