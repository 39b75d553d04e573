"""dha: turn a transformer checkpoint into one with a much smaller KV cache by Decoupled-Head
Attention (Chen et al., NeurIPS 2024), and measure what it costs."""

__version__ = "0.1.0"
