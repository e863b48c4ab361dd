"""Attention modules built on :func:`headwise.attend`."""

from headwise.modules.attention import MHAOutput, MultiHeadAttention
from headwise.modules.hyperbolic import HyperbolicAttention
from headwise.modules.moe import MoEAttention

__all__ = ["MultiHeadAttention", "MHAOutput", "HyperbolicAttention", "MoEAttention"]
