"""Hugging Face config for a dha (decoupled-head attention) model, written by `dha export`.

The model's own configuration (dha's ModelConfig: sizes, per-layer key_index / value_index maps,
norm, MLP and position settings) is kept whole under `dha`, so nothing is lost or renamed. A few
standard fields are mirrored at the top level because transformers' utilities read them
(vocab_size for generation, num_hidden_layers for the cache).

Generated from dha/remote_code/configuration_dha.py; load with trust_remote_code=True.
"""

from transformers import PretrainedConfig


class DhaConfig(PretrainedConfig):
    model_type = "dha"

    def __init__(self, dha=None, use_cache=True, **kwargs):
        # The ModelConfig fields as a dict (see dha_model.ModelConfig); None only for an empty config.
        self.dha = dict(dha) if dha else {}
        self.use_cache = use_cache  # generate() keeps a KV cache of each layer's own heads
        if self.dha:
            self.vocab_size = self.dha["vocab_size"]
            self.hidden_size = self.dha["hidden_size"]
            self.num_hidden_layers = self.dha["num_layers"]
            self.num_attention_heads = self.dha["num_heads"]
            self.head_dim = self.dha["head_dim"]
            self.max_position_embeddings = self.dha["max_position_embeddings"]
            kwargs["tie_word_embeddings"] = bool(self.dha["tie_word_embeddings"])
        super().__init__(**kwargs)
