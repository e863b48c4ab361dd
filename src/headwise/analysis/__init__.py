"""Head analysis: metrics, capture, importance, pruning and rollout of attention heads."""

from headwise.analysis.cache import AttentionCache, HeadStats
from headwise.analysis.hf import capture, head_sites, register, run_cached

__all__ = ["AttentionCache", "HeadStats", "capture", "head_sites", "register", "run_cached"]
