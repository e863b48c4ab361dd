"""``headwise bench train``: a tiny character-level causal LM trained with each attention.

The text is real and ships with every Python: the source files of the standard library,
read in sorted order. Bytes are tokens (vocabulary 256). Each variant trains the same
2-layer pre-norm transformer from the same seed for the same steps on the same batches;
only the attention module differs. torch's ``nn.MultiheadAttention`` and headwise's
``MultiHeadAttention`` start from identical weights (``from_torch``), so their validation
losses must agree (the modules issue asks for 1%).
"""

from __future__ import annotations

import math
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from headwise.masks import causal, sliding_window
from headwise.modules import MoEAttention, MultiHeadAttention


@dataclass(frozen=True)
class TrainConfig:
    d_model: int = 128
    heads: int = 8
    layers: int = 2
    context: int = 128
    batch: int = 32
    steps: int = 300
    lr: float = 3e-3
    eval_batches: int = 20
    text_bytes: int = 2_000_000
    seed: int = 0
    window: int = 32


def stdlib_text(n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the standard library's .py files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        total += len(data)
        if total >= n_bytes:
            break
    return b"".join(out)[:n_bytes]


class _TorchCausal(nn.Module):
    """nn.MultiheadAttention with a causal mask, in our module's calling convention."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, x: Tensor) -> Tensor:
        L = x.shape[1]
        blocked = torch.triu(torch.ones(L, L, dtype=torch.bool, device=x.device), diagonal=1)
        return self.mha(x, x, x, attn_mask=blocked, need_weights=False)[0]


class _Ours(nn.Module):
    def __init__(self, mha: nn.Module, mask):
        super().__init__()
        self.mha, self.mask = mha, mask

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, mask=self.mask).out


class _MoE(nn.Module):
    def __init__(self, moe: MoEAttention):
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        return self.moe(x)


class Block(nn.Module):
    def __init__(self, d: int, attention: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, cfg: TrainConfig, make_attention: Callable[[], nn.Module]):
        super().__init__()
        self.tok = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, make_attention()) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))

    def aux_loss(self) -> Tensor:
        losses = [b.attention.moe.aux_loss for b in self.blocks if isinstance(b.attention, _MoE)]
        return sum(losses) if losses else torch.zeros(())


def attention_factories(cfg: TrainConfig) -> dict[str, Callable[[], nn.Module]]:
    """Each variant builds its attention modules from the same random stream."""
    d, h = cfg.d_model, cfg.heads

    def torch_mha():
        return _TorchCausal(nn.MultiheadAttention(d, h, batch_first=True))

    def ours():
        theirs = nn.MultiheadAttention(d, h, batch_first=True)
        # from_torch builds (and initialises) a module before copying: keep the random
        # stream where torch's variant leaves it, so the MLPs start identical too.
        state = torch.random.get_rng_state()
        mha = MultiHeadAttention.from_torch(theirs)
        torch.random.set_rng_state(state)
        return _Ours(mha, causal)

    def gqa():
        return _Ours(MultiHeadAttention(d, h, num_kv_heads=2), causal)

    def window():
        return _Ours(MultiHeadAttention(d, h), sliding_window(cfg.window))

    def moe():
        return _MoE(MoEAttention(d, num_experts=4, heads_per_expert=2, mask=causal, jitter=0.01))

    return {
        "torch nn.MultiheadAttention": torch_mha,
        "headwise MultiHeadAttention": ours,
        "headwise GQA 8/2": gqa,
        f"headwise sliding window {cfg.window}": window,
        "headwise MoEAttention 4x2 heads, top-1": moe,
    }


def batches(data: Tensor, cfg: TrainConfig, n: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - cfg.context - 1, (n, cfg.batch), generator=g)
    return [torch.stack([data[s : s + cfg.context + 1] for s in row.tolist()]) for row in starts]


def evaluate(model: CharLM, val: list[Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()) for b in val]
    model.train()
    return float(torch.stack(losses).mean())


def train_all(cfg: TrainConfig, progress: Callable[[str], None] = print) -> list[dict]:
    text = stdlib_text(cfg.text_bytes)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    train_b = batches(train_data, cfg, cfg.steps, cfg.seed + 1)
    val_b = batches(val_data, cfg, cfg.eval_batches, cfg.seed + 2)
    results = []
    for name, make in attention_factories(cfg).items():
        torch.manual_seed(cfg.seed)
        model = CharLM(cfg, make)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
        initial = evaluate(model, val_b)
        t0 = time.perf_counter()
        for step, b in enumerate(train_b):
            logits = model(b[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
            (loss + 0.01 * model.aux_loss()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if step % 50 == 0:
                progress(f"{name}: step {step}/{cfg.steps} loss {loss.item():.3f}")
        seconds = time.perf_counter() - t0
        val = evaluate(model, val_b)
        results.append(
            {
                "attention": name,
                "val_loss": val,
                "val_bits_per_byte": val / math.log(2),
                "initial_val_loss": initial,
                "train_seconds": seconds,
                "ms_per_step": 1e3 * seconds / cfg.steps,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    return results


def to_markdown(results: list[dict], cfg: TrainConfig, command: str) -> str:
    ref = next(r for r in results if r["attention"].startswith("torch"))
    ours = next(r for r in results if r["attention"] == "headwise MultiHeadAttention")
    gap = abs(ours["val_loss"] - ref["val_loss"]) / ref["val_loss"]
    lines = [
        "# Training check: tiny character-level LM on the Python standard library",
        "",
        f"Command: `{command}`",
        "",
        f"Config: {cfg}. Text: the first {cfg.text_bytes:,} bytes of the stdlib's *.py files (sorted), "
        "90% train / 10% validation; bytes as tokens. Same seed, batches and steps for every row.",
        "",
        "| attention | parameters | initial val loss | val loss (nats/byte) | bits/byte | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['attention']} | {r['parameters']:,} | {r['initial_val_loss']:.4f} | {r['val_loss']:.4f} "
            f"| {r['val_bits_per_byte']:.3f} | {r['ms_per_step']:.1f} |"
        )
    lines += [
        "",
        f"headwise MultiHeadAttention vs torch (same initial weights): relative gap in validation loss "
        f"{100 * gap:.3f}% ({'within' if gap <= 0.01 else 'NOT within'} the 1% goal).",
    ]
    return "\n".join(lines) + "\n"
