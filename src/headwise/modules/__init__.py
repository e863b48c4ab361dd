"""Attention modules built on :func:`headwise.attend`."""

from headwise.modules.attention import MHAOutput, MultiHeadAttention
from headwise.modules.hyperbolic import HyperbolicAttention

__all__ = ["MultiHeadAttention", "MHAOutput", "HyperbolicAttention"]
