"""Configuration of a Nemotron-NAS (DeciLMForCausalLM) checkpoint written by `dha export --format nemotron-nas`.

Serving engines read the per-layer `block_configs` by attribute (vLLM's nemotron_nas.py:
`block_config.attention.no_op`, `.attention.n_heads_in_group`, `.ffn.no_op`, `.ffn.ffn_mult`, and
`hasattr(block_config.ffn, ...)` for optional fields), so each section is an object holding exactly
the fields of config.json, no defaults added. Written for dha; only the configuration, no model
code (the engines bring their own DeciLM model).
"""

from types import SimpleNamespace

from transformers import LlamaConfig


class BlockConfig(SimpleNamespace):
    """One layer: `attention` and `ffn` sections with attribute access."""

    @classmethod
    def from_dict(cls, d: dict) -> "BlockConfig":
        return cls(**{name: SimpleNamespace(**section) for name, section in d.items()})

    def to_dict(self) -> dict:
        return {name: dict(vars(section)) for name, section in vars(self).items()}


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [
            b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b) for b in block_configs or []
        ]
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["block_configs"] = [b.to_dict() for b in self.block_configs]
        return d
