"""PNG figures of a :class:`~headwise.analysis.corpus.CorpusAnalysis` (matplotlib, Agg backend).

- ``heads_layer<l>.png``: one heatmap per cached head of layer l on the first text;
- ``diversity.png``: the head x head Jensen-Shannon and cosine matrices;
- ``entropy_per_layer.png``: mean entropy of every head per layer, with ln n (uniform);
- ``importance.png``: gradient importance of every head, as bars.

Every file is written to a temporary name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from headwise.analysis.corpus import CorpusAnalysis


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def write_figures(res: CorpusAnalysis, out: Path | str) -> list[Path]:
    """Write every figure the analysis supports into ``out``; return their paths."""
    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    toks = res.example_tokens
    for lay, w in res.example_weights.items():
        H = w.shape[0]
        cols = min(H, 4)
        rows = -(-H // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i >= H:
                continue
            ax.imshow(w[i].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"L{lay}H{res.heads[i]}", fontsize=9)
            if len(toks) <= 24:
                ax.axis("on")
                ax.set_xticks(range(len(toks)), toks, rotation=90, fontsize=6)
                ax.set_yticks(range(len(toks)), toks, fontsize=6)
        fig.suptitle(f"layer {lay}: attention of each head on the first text")
        fig.tight_layout()
        paths.append(_save(fig, out / f"heads_layer{lay}.png"))
    if res.js is not None and res.cosine is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
        for ax, mat, title in (
            (axes[0], res.js, "Jensen-Shannon per query row (nats)"),
            (axes[1], res.cosine, "cosine"),
        ):
            im = ax.imshow(mat.numpy(), cmap="magma_r" if mat is res.js else "viridis")
            ax.set_title(title)
            ticks = [i * len(res.heads) for i in range(len(res.layers))]
            ax.set_xticks(ticks, [f"L{lay}" for lay in res.layers])
            ax.set_yticks(ticks, [f"L{lay}" for lay in res.layers])
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle("head x head diversity (heads in layer order)")
        fig.tight_layout()
        paths.append(_save(fig, out / "diversity.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    ent = res.metrics["entropy"]
    for j in range(ent.shape[1]):
        ax.scatter(res.layers, ent[:, j].numpy(), s=12, color="tab:blue", alpha=0.6)
    ax.plot(res.layers, ent.mean(1).numpy(), color="tab:red", marker="o", label="layer mean")
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy (nats)")
    ax.set_title("entropy of every head per layer")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "entropy_per_layer.png"))
    if res.importance is not None:
        imp = res.importance.normalized
        fig, ax = plt.subplots(figsize=(12, 3.5))
        ax.bar(range(imp.numel()), imp.flatten().numpy(), color="tab:green")
        ax.set_xticks([i * imp.shape[1] for i in range(imp.shape[0])], [f"L{i}" for i in range(imp.shape[0])])
        ax.set_ylabel("importance (layer-normalised)")
        ax.set_title("gradient head importance (Michel et al. 2019)")
        fig.tight_layout()
        paths.append(_save(fig, out / "importance.png"))
    return paths
