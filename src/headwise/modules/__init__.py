"""Attention modules built on :func:`headwise.attend`."""

from headwise.modules.attention import MHAOutput, MultiHeadAttention

__all__ = ["MultiHeadAttention", "MHAOutput"]
