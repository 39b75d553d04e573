"""Hugging Face wrapper around dha's Transformer, written by `dha export` beside its weights.

Decoupled-head attention (Chen et al. 2024, "DHA", arXiv 2406.06567) gives each layer its own
number of key heads and value heads, and maps every query head to one of each
(config.dha["key_index"] / ["value_index"]). No stock transformers class expresses that, so the
export carries its model code: `dha_model.py` is an exact copy of dha/model.py (one source of
truth), and this file adapts it to transformers' PreTrainedModel / GenerationMixin interface.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

Supported: forward (logits, optional loss), and `generate` with transformers' DynamicCache, which
stores only each layer's own Hk key heads and Hv value heads. Not supported: padded batches
(attention_mask with zeros), inputs_embeds, custom position_ids.

Generated from dha/remote_code/modeling_dha.py.
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dha import DhaConfig
from .dha_model import Attention, ModelConfig, Transformer

# transformers 5.x renamed the output's `past_key_values` to `cache`; accept either spelling.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _CacheView:
    """dha's cache interface (`length`, `update(layer, k, v)`) over a transformers Cache.

    k (B, Hk, T, hd) and v (B, Hv, T, hd) are stored as they are: key and value head counts may
    differ, per layer, and transformers' dynamic cache layers keep them as separate tensors.
    The model advances `length` itself after the last layer.
    """

    def __init__(self, cache):
        self.cache = cache
        self.length = cache.get_seq_length()

    def update(self, layer, k, v):
        return self.cache.update(k, v, layer)


class DhaPreTrainedModel(PreTrainedModel):
    config_class = DhaConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # Every parameter comes from the checkpoint. transformers builds the model on the meta
        # device and materialises non-persistent buffers empty, then calls this for each module
        # holding one: recompute them all from the config (RoPE frequencies, head maps, ...).
        if isinstance(module, (Transformer, Attention)):
            self._restore_buffers()

    def _restore_buffers(self):
        self.model.init_buffers()  # dha_model's own recipe, whatever buffers it defines
        for module in self.model.modules():
            params = list(module.parameters())
            for name, buffer in module.named_buffers(recurse=False):
                if params and buffer.device != params[0].device:
                    buffer = buffer.to(params[0].device)
                    setattr(module, name, buffer)
                buffer._is_hf_initialized = True  # transformers then skips the other modules


class DhaForCausalLM(DhaPreTrainedModel, GenerationMixin):
    # Applied only when config.tie_word_embeddings is true (transformers reads the config).
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: DhaConfig):
        super().__init__(config)
        self.model = Transformer(ModelConfig.from_dict(config.dha))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        cache=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        inputs_embeds=None,
        **kwargs,
    ):
        if inputs_embeds is not None:
            raise ValueError("DhaForCausalLM takes input_ids, not inputs_embeds")
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise ValueError(
                "DhaForCausalLM does not support padding (attention_mask with zeros): pass unpadded batches"
            )
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if cache is None and use_cache and labels is None:
            cache = DynamicCache()
        view = _CacheView(cache) if cache is not None else None
        # dha's positions continue from the cache length, which is right for unpadded inputs.
        logits = self.model(input_ids, view)  # (B, T, V)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        loss = None
        if labels is not None:
            # Next-token loss: position t predicts labels[t + 1]; -100 is ignored (HF convention).
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
