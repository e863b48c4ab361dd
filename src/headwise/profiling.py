"""Named profiler scopes that cost nothing when no profiler runs.

``torch.profiler.record_function`` costs several microseconds per use even when no profiler
is active; :func:`scope` checks first (about 0.1 us) so kernels can label their components
(QK^T, mask/score, softmax, AV, projections) for the component breakdown of
``headwise bench components`` without slowing ordinary calls.

Example:
    >>> import torch
    >>> with scope("headwise::qk"):
    ...     x = torch.ones(2, 2) @ torch.ones(2, 2)
    >>> with torch.profiler.profile() as prof:
    ...     with scope("headwise::qk"):
    ...         x = torch.ones(2, 2) @ torch.ones(2, 2)
    >>> any(e.key == "headwise::qk" for e in prof.key_averages())
    True
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.autograd.profiler import record_function

# Labels of the component breakdown, in the order of a forward pass.
QKV_PROJECTION = "headwise::qkv_projection"
QK = "headwise::qk"
MASK_SCORE = "headwise::mask_score"
SOFTMAX = "headwise::softmax"
AV = "headwise::av"
OUTPUT_PROJECTION = "headwise::output_projection"
ATTENTION_CORE = "headwise::attention_core"
COMPONENTS = (QKV_PROJECTION, QK, MASK_SCORE, SOFTMAX, AV, OUTPUT_PROJECTION)


def scope(name: str) -> AbstractContextManager:
    """A ``record_function`` scope while a profiler runs, else a no-op context."""
    if torch.autograd._profiler_enabled():
        return record_function(name)
    return nullcontext()
