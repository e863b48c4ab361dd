"""Report sections 3, 4 and 8: heads on a real sentence, head diversity, single-head equivalence.

Shape legend: a sentence of T tokens; x (1, T, 64) MiniLM token embeddings projected onto
their top 64 principal directions; per-head weights (H, T, T); MiniLM's attentions
(1, 12, T, T) per layer. Diversity compares the H maps of one layer pairwise.

Example:
    >>> import torch
    >>> from headwise.report.heads import pairwise_diversity
    >>> same = torch.full((3, 4, 4), 0.25)
    >>> d = pairwise_diversity(same)
    >>> round(d["cosine"], 6), round(d["js"], 6), d["pairs"]
    (1.0, 0.0, 3)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import Tensor, nn

from headwise.errors import bad_argument
from headwise.masks import causal
from headwise.modules import MultiHeadAttention
from headwise.report.common import Section, Table, check_flag, check_seed, fmt, new_figure, row_entropy

SENTENCE = "The trophy did not fit into the brown suitcase because it was too big."
HEAD_COUNTS = (1, 2, 4, 8, 16)


@lru_cache(maxsize=1)
def _minilm():
    from headwise.pretrained import load_minilm

    return load_minilm("eager")


@torch.no_grad()
def minilm_sentence(sentence: str = SENTENCE, dim: int = 64) -> dict:
    """Tokens, MiniLM embeddings projected to ``dim`` (1, T, dim) and MiniLM's attentions.

    The projection is onto the top ``dim`` principal directions of MiniLM's word-embedding
    table (eigenvectors of its 384 x 384 covariance), scaled to unit variance overall.
    """
    if not isinstance(sentence, str) or not sentence.strip():
        raise bad_argument("sentence", "a non-empty string", repr(sentence))
    tokenizer, model = _minilm()
    batch = tokenizer([sentence], return_tensors="pt")
    out = model(**batch, output_attentions=True)
    emb = model.embeddings(input_ids=batch["input_ids"]).float()
    table = model.embeddings.word_embeddings.weight.detach().double()
    centred = table - table.mean(0)
    _, vecs = torch.linalg.eigh(centred.T @ centred)
    basis = vecs[:, -dim:].flip(-1).float()  # (384, dim), largest variance first
    x = (emb - table.mean(0).float()) @ basis
    x = x / x.std()
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    return {"tokens": tokens, "x": x, "attentions": [a.float() for a in out.attentions]}


def head_profile(w: Tensor, tokens: list[str]) -> list[dict]:
    """Per head of ``w`` (H, T, T): mean row entropy and where the weight goes on average."""
    T = w.shape[-1]
    idx = torch.arange(T)
    special = {name: [i for i, t in enumerate(tokens) if t == name] for name in ("[CLS]", "[SEP]")}
    prof = []
    for h in range(w.shape[0]):
        m = w[h]
        rec = {
            "head": h,
            "entropy": float(row_entropy(m).mean()),
            "self": float(m[idx, idx].mean()),
            "previous": float(m[idx[1:], idx[:-1]].mean()),
            "next": float(m[idx[:-1], idx[1:]].mean()),
        }
        for name, cols in special.items():
            rec[name] = float(m[:, cols].sum(-1).mean()) if cols else 0.0
        prof.append(rec)
    return prof


def _heatmaps(ws: Tensor, tokens: list[str], cols: int, title: str):
    H = ws.shape[0]
    rows = math.ceil(H / cols)
    fig, axes = new_figure(rows, cols, width=2.6 * cols, height=2.7 * rows)
    for h in range(rows * cols):
        ax = axes[h // cols, h % cols]
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(ws[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}: H={float(row_entropy(ws[h]).mean()):.2f}", fontsize=8)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=5)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=5)
    fig.suptitle(title, fontsize=10)
    return fig


def _describe(prof: list[dict], what: str) -> str:
    parts = []
    for key, label in (("[SEP]", "to [SEP]"), ("[CLS]", "to [CLS]"), ("previous", "to the previous token")):
        best = max(prof, key=lambda r: r[key])
        parts.append(f"head {best['head']} sends {100 * best[key]:.0f}% {label}")
    return f"In {what}, " + "; ".join(parts)


def per_head_heatmaps(*, quick: bool = False, seed: int = 0, layer: int = 2, sentence: str = SENTENCE) -> Section:
    """Section 3: an 8-head MultiHeadAttention(64) and MiniLM's 12 heads on one real sentence.

    ``data`` holds the tokens, both sets of weights (H, T, T) and per-head profiles
    (entropy, weight on [CLS], [SEP], self, previous and next token).
    """
    check_flag("quick", quick)
    check_seed(seed)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < 6:
        raise bad_argument("layer", "a MiniLM layer index in [0, 6)", repr(layer))
    s = minilm_sentence(sentence)
    tokens, x = s["tokens"], s["x"]
    torch.manual_seed(seed)
    mha = MultiHeadAttention(64, 8).eval()
    with torch.no_grad():
        ours = mha(x, need_weights=True, backend="reference").weights[0]
    real = s["attentions"][layer][0]
    T = len(tokens)
    p_ours, p_real = head_profile(ours, tokens), head_profile(real, tokens)
    e_ours = [r["entropy"] for r in p_ours]
    e_real = [r["entropy"] for r in p_real]
    finding = (
        f"On the {T} tokens of \u201c{sentence}\u201d, the 8 randomly initialised heads of MultiHeadAttention(64, 8) "
        f"have mean row entropies between {fmt(min(e_ours))} and {fmt(max(e_ours))} nats, close to uniform "
        f"(log {T} = {fmt(math.log(T))}): untrained projections give near-uniform attention. MiniLM's layer {layer} "
        f"heads range from {fmt(min(e_real))} to {fmt(max(e_real))} nats. "
        + _describe(p_real, f"MiniLM layer {layer}")
        + "."
    )
    sec = Section(
        "heads",
        3,
        "Per-head heatmaps on a real sentence",
        finding,
        data={
            "sentence": sentence,
            "tokens": tokens,
            "layer": layer,
            "mha_profiles": p_ours,
            "minilm_profiles": p_real,
            "mha_weights": ours,
            "minilm_weights": real,
        },
    )
    sec.add_figure(
        "heads_mha",
        _heatmaps(ours, tokens, 4, "MultiHeadAttention(64, 8), random init, MiniLM token embeddings"),
        "The 8 heads of a randomly initialised MultiHeadAttention(d_model=64) on MiniLM token embeddings "
        "(projected onto their top 64 principal directions). H = mean row entropy (nats).",
    )
    sec.add_figure(
        "heads_minilm",
        _heatmaps(real, tokens, 6, f"all-MiniLM-L6-v2, layer {layer}"),
        f"The 12 heads of MiniLM layer {layer} on the same sentence (rows: queries, columns: keys).",
    )
    return sec


def pairwise_diversity(w: Tensor) -> dict:
    """Mean pairwise cosine similarity and Jensen-Shannon divergence of heads ``w`` (H, L, S).

    Cosine compares the flattened L x S maps of two heads; JS (nats, at most log 2) is taken
    per query row and averaged over rows (``headwise.analysis.metrics.cosine_matrix`` and
    ``js_matrix(reduction="mean")``). ``pairs`` is H(H-1)/2; with one head both are None.
    """
    if not isinstance(w, Tensor) or w.dim() != 3:
        raise bad_argument("w", "a tensor (H, L, S) of attention weights", getattr(w, "shape", type(w).__name__))
    from headwise.analysis.metrics import cosine_matrix, js_matrix

    H = w.shape[0]
    if H < 2:
        return {"cosine": None, "js": None, "pairs": 0}
    w = w.double()
    iu = torch.triu_indices(H, H, offset=1)
    cos, js = cosine_matrix(w)[iu[0], iu[1]], js_matrix(w, reduction="mean")[iu[0], iu[1]]
    return {"cosine": float(cos.mean()), "js": float(js.mean()), "pairs": int(iu.shape[1])}


class _CausalSelf(nn.Module):
    def __init__(self, mha: MultiHeadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, mask=causal).out


@torch.no_grad()
def _lm_weights(model: nn.Module, idx: Tensor) -> list[Tensor]:
    """Per-layer weights (N, H, T, T) of a CharLM on byte sequences ``idx`` (N, T)."""
    x = model.tok(idx) + model.pos(torch.arange(idx.shape[1]))
    out = []
    for block in model.blocks:
        out.append(block.attention.mha(block.ln1(x), mask=causal, need_weights=True).weights)
        x = block(x)
    return out


@lru_cache(maxsize=1)
def _stdlib_bytes(n: int) -> Tensor:
    from headwise.bench.train import stdlib_text

    return torch.frombuffer(bytearray(stdlib_text(n)), dtype=torch.uint8).long()


@contextmanager
def single_thread():
    """Run torch on one thread: tiny matrices gain nothing from two, and lose a lot under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_char_lm(heads: int, steps: int, seed: int = 0):
    """The modules issue's tiny character LM (d_model 64, 2 layers, context 64) trained ``steps`` steps.

    Returns (model, validation batch (8, 64) of stdlib bytes, initial and final validation loss).
    """
    from headwise.bench.train import CharLM, TrainConfig, batches, evaluate

    cfg = TrainConfig(d_model=64, heads=heads, layers=2, context=64, batch=16, steps=steps, text_bytes=400_000)
    data = _stdlib_bytes(cfg.text_bytes)
    split = int(0.9 * len(data))
    train_b = batches(data[:split], cfg, steps, seed + 1)
    val_b = batches(data[split:], cfg, 4, seed + 2)
    torch.manual_seed(seed)
    model = CharLM(cfg, lambda: _CausalSelf(MultiHeadAttention(cfg.d_model, heads)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    initial = evaluate(model, val_b)
    for b in train_b:
        loss = nn.functional.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model, val_b[0][:8, :-1], initial, evaluate(model, val_b)


def _diversity_of_layers(per_layer: list[Tensor]) -> dict:
    """Average pairwise diversity over layers and sequences of weights (N, H, T, T) per layer."""
    recs = [pairwise_diversity(w[n]) for w in per_layer for n in range(w.shape[0])]
    ent = float(torch.stack([row_entropy(w).mean() for w in per_layer]).mean())
    if recs[0]["pairs"] == 0:
        return {"cosine": None, "js": None, "entropy": ent}
    return {
        "cosine": sum(r["cosine"] for r in recs) / len(recs),
        "js": sum(r["js"] for r in recs) / len(recs),
        "entropy": ent,
    }


def head_diversity(
    *, quick: bool = False, seed: int = 0, head_counts: tuple[int, ...] = HEAD_COUNTS, steps: int | None = None
) -> Section:
    """Section 4: head diversity for 1, 2, 4, 8, 16 heads, random init vs trained, and MiniLM.

    Random init: MultiHeadAttention(64, H) on the MiniLM sentence of section 3. Trained: the
    character LM of the modules issue (2 layers, d_model 64, H heads) after ``steps`` steps
    on the standard library's source, weights on 8 validation sequences of 64 bytes.
    MiniLM: its 12 real heads per layer on the sentence. Lower cosine and higher JS mean
    more diverse heads.
    """
    check_flag("quick", quick)
    check_seed(seed)
    steps = (10 if quick else 100) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise bad_argument("steps", "an int >= 0", repr(steps))
    s = minilm_sentence()
    rows = []
    for H in head_counts:
        if isinstance(H, bool) or not isinstance(H, int) or H < 1 or 64 % H:
            raise bad_argument("head_counts", "divisors of 64", repr(head_counts))
        torch.manual_seed(seed)
        mha = MultiHeadAttention(64, H).eval()
        with torch.no_grad():
            w = mha(s["x"], need_weights=True, backend="reference").weights
        with single_thread():
            model, val, initial, final = train_char_lm(H, steps, seed)
            rand, trained = _diversity_of_layers([w]), _diversity_of_layers(_lm_weights(model, val))
        rows.append(
            {
                "heads": H,
                "random": rand,
                "trained": trained,
                "lm_initial_val_loss": initial,
                "lm_final_val_loss": final,
            }
        )
    minilm = [_diversity_of_layers([a]) for a in s["attentions"]]
    data = {"trained_steps": steps, "rows": rows, "minilm_per_layer": minilm}
    fig, axes = new_figure(1, 2, width=10, height=3.6)
    multi = [r for r in rows if r["random"]["cosine"] is not None]
    xs = [r["heads"] for r in multi]
    for ax, key, label in ((axes[0, 0], "cosine", "mean pairwise cosine"), (axes[0, 1], "js", "mean pairwise JS")):
        ax.plot(xs, [r["random"][key] for r in multi], "o-", label="MultiHeadAttention, random init")
        ax.plot(xs, [r["trained"][key] for r in multi], "s-", label=f"char LM after {steps} steps")
        mean_minilm = sum(m[key] for m in minilm) / len(minilm)
        ax.axhline(mean_minilm, color="gray", ls="--", lw=1, label="MiniLM, 12 heads (mean of 6 layers)")
        ax.set(xscale="log", xlabel="heads", ylabel=label + (" (nats)" if key == "js" else ""))
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend(fontsize=7)
    axes[0, 0].set_title("Similarity of heads (1 = identical)")
    axes[0, 1].set_title("Jensen-Shannon divergence (0 = identical)")
    fmt_opt = lambda v: "n/a (one head, no pair)" if v is None else f"{v:.3f}"  # noqa: E731
    table = Table(
        "Head diversity (pairs of heads within a layer; one head has no pair)",
        ["heads", "random cosine", "random JS", "trained cosine", "trained JS", "trained entropy", "LM val loss"],
        [
            [
                str(r["heads"]),
                fmt_opt(r["random"]["cosine"]),
                fmt_opt(r["random"]["js"]),
                fmt_opt(r["trained"]["cosine"]),
                fmt_opt(r["trained"]["js"]),
                f"{r['trained']['entropy']:.3f}",
                f"{r['lm_initial_val_loss']:.2f} -> {r['lm_final_val_loss']:.2f}",
            ]
            for r in rows
        ],
    )
    top = max(multi, key=lambda r: r["heads"])
    js_r, js_t = top["random"]["js"], top["trained"]["js"]
    m_js = sum(m["js"] for m in minilm) / len(minilm)
    m_cos = sum(m["cosine"] for m in minilm) / len(minilm)
    finding = (
        "At random init, the heads of MultiHeadAttention(64, H) on the sentence have mean pairwise cosine "
        + ", ".join(f"{r['random']['cosine']:.3f} (H={r['heads']})" for r in multi)
        + f". After {steps} training steps of the character LM (validation loss {rows[-1]['lm_initial_val_loss']:.2f}"
        f" -> {rows[-1]['lm_final_val_loss']:.2f} nats/byte at H={rows[-1]['heads']}), the JS divergence between "
        f"heads at H={top['heads']} is {js_t:.3f} nats vs {js_r:.3f} at random init "
        f"({'more' if js_t > js_r else 'less'} diverse), cosine {top['trained']['cosine']:.3f} vs "
        f"{top['random']['cosine']:.3f}. MiniLM's real heads average cosine {m_cos:.3f} and JS {m_js:.3f} nats per "
        f"layer. A single head has no partner: its one pattern is all the model gets per layer."
    )
    sec = Section("diversity", 4, "Multi-head vs single-head: head diversity", finding, data=data)
    sec.tables.append(table)
    sec.add_figure("diversity", fig, "Mean pairwise cosine similarity and JS divergence of heads vs number of heads.")
    return sec


def single_head_equivalence(*, quick: bool = False, seed: int = 0, tol: float = 1e-12) -> Section:
    """Section 8: MultiHeadAttention(h=1) vs plain self-attention written with torch ops, float64.

    Plain: ``softmax((x Wq + bq)(x Wk + bk)^T / sqrt(E)) (x Wv + bv) Wo + bo`` on the same
    parameter tensors. Forward output and the gradients of <y, g> with respect to x and
    every parameter are compared for each backend (and torch's nn.MultiheadAttention).
    """
    check_flag("quick", quick)
    check_seed(seed)
    B, L, E = (2, 12, 16) if quick else (2, 48, 64)
    torch.manual_seed(seed)
    mha = MultiHeadAttention(E, 1, dtype=torch.float64)
    with torch.no_grad():
        for p in mha.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    x = torch.randn(B, L, E, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, L, E, dtype=torch.float64)
    params = dict(x=x, **{n: p for n, p in mha.named_parameters() if p.requires_grad})

    def plain() -> Tensor:
        wq, wk, wv = mha.in_proj_weight.split(E)
        bq, bk, bv = mha.in_proj_bias.split(E)
        q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(E), dim=-1)
        return (p @ v) @ mha.out_proj.weight.T + mha.out_proj.bias

    def grads(y: Tensor, names: list[str], tensors: list[Tensor]) -> dict[str, Tensor]:
        return dict(zip(names, torch.autograd.grad((y * g).sum(), tensors)))

    y0 = plain()
    g0 = grads(y0, list(params), list(params.values()))
    rows = []
    for backend in ("reference", "eager", "tiled", "sdpa", "auto"):
        y = mha(x, backend=backend).out
        gb = grads(y, list(params), list(params.values()))
        rows.append(_diff_row(f"headwise {backend}", y, y0, gb, g0, tol))
    theirs = mha.to_torch()
    tparams = {"x": x, "in_proj_weight": theirs.in_proj_weight, "in_proj_bias": theirs.in_proj_bias}
    tparams |= {"out_proj.weight": theirs.out_proj.weight, "out_proj.bias": theirs.out_proj.bias}
    yt = theirs(x, x, x, need_weights=False)[0]
    gt = grads(yt, list(tparams), list(tparams.values()))
    rows.append(_diff_row("torch nn.MultiheadAttention", yt, y0, gt, g0, tol))
    worst_f = max(r["forward_max_diff"] for r in rows)
    worst_b = max(r["backward_max_diff"] for r in rows)
    n_pass = sum(r["passed"] for r in rows)
    finding = (
        f"In float64 (B={B}, L={L}, E={E}), MultiHeadAttention with one head matches plain self-attention written "
        f"with torch ops: the largest forward difference over {len(rows)} implementations is {worst_f:.2e} and the "
        f"largest gradient difference (x and all {len(params) - 1} parameters) {worst_b:.2e}; {n_pass} of "
        f"{len(rows)} are within {tol:.0e} ({'PASS' if n_pass == len(rows) else 'FAIL'})."
    )
    sec = Section(
        "equivalence",
        8,
        "Single-head equivalence",
        finding,
        data={"shape": [B, L, E], "tolerance": tol, "rows": rows, "passed": n_pass == len(rows)},
    )
    sec.tables.append(
        Table(
            "max |difference| to plain self-attention, float64",
            ["implementation", "forward", "backward (worst gradient)", "worst gradient of", "result"],
            [
                [r["implementation"], f"{r['forward_max_diff']:.2e}", f"{r['backward_max_diff']:.2e}"]
                + [r["worst_gradient"], "PASS" if r["passed"] else "FAIL"]
                for r in rows
            ],
        )
    )
    fig, axes = new_figure(1, 1, width=7, height=3.2)
    ax = axes[0, 0]
    names = [r["implementation"] for r in rows]
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [max(r["forward_max_diff"], 1e-18) for r in rows], 0.4, label="forward")
    ax.barh([y + 0.2 for y in ys], [max(r["backward_max_diff"], 1e-18) for r in rows], 0.4, label="backward")
    ax.axvline(tol, color="red", ls="--", lw=1, label=f"tolerance {tol:.0e}")
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.set(xscale="log", xlabel="max |difference| (float64; 1e-18 stands for exactly 0)")
    ax.legend(fontsize=7)
    sec.add_figure("equivalence", fig, "Largest forward and gradient differences to plain self-attention.")
    return sec


def _diff_row(name: str, y: Tensor, y0: Tensor, gb: dict, g0: dict, tol: float) -> dict:
    diffs = {n: float((gb[n] - g0[n]).detach().abs().max()) for n in g0}
    worst = max(diffs, key=diffs.get)
    fwd = float((y - y0).detach().abs().max())
    return {
        "implementation": name,
        "forward_max_diff": fwd,
        "backward_max_diff": diffs[worst],
        "worst_gradient": worst,
        "gradient_diffs": diffs,
        "passed": fwd <= tol and diffs[worst] <= tol,
    }
