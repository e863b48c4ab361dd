"""headwise: multi-head attention, head by head. Exact, fast and inspectable."""

from headwise.attend import attend
from headwise.caches import cache_info, clear_caches
from headwise.errors import HeadwiseError
from headwise.kernels.base import AttentionOutput, AttentionStats
from headwise.kernels.tuning import clear_tuning, tune, tuned, tuning_file
from headwise.masks import and_masks, causal, chunked, local, or_masks, padding, per_head_windows, sliding_window
from headwise.plan import AttentionPlan, plan
from headwise.scores import alibi, alibi_slopes, poincare, softcap, temperature

__version__ = "0.1.0"

__all__ = [
    "attend",
    "plan",
    "AttentionPlan",
    "tune",
    "tuned",
    "tuning_file",
    "clear_tuning",
    "clear_caches",
    "cache_info",
    "AttentionOutput",
    "AttentionStats",
    "HeadwiseError",
    "causal",
    "sliding_window",
    "local",
    "chunked",
    "padding",
    "per_head_windows",
    "and_masks",
    "or_masks",
    "alibi",
    "alibi_slopes",
    "softcap",
    "temperature",
    "poincare",
]
