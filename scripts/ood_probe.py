"""Can a query's embedding tell the enhancer's training queries from the transfer sets? Measured.

Usage: ``.venv/bin/python scripts/ood_probe.py runs/wordnet > benchmarks/results/memory_ood_probe.md``
(after ``headwise memory build --dataset wordnet --out runs/wordnet`` and ``headwise memory
transfer-sets``). Two detectors that use no transfer query, each with its threshold set so
that 95% of the W1 *validation* queries pass (count as "like the training queries"):

- **density**: the Mahalanobis distance of a query to a Gaussian (mean, covariance shrunk by
  0.1 toward the identity) fitted on the W1 training queries (a one-class detector: no negatives);
- **classifier**: a two-layer MLP on the query vector trained to separate the W1 training queries
  from corpus pseudo-queries (spans of glosses, the gate's second style), class-balanced.

The first table gives the share of each query set that passes. A do-no-harm design that routes
by either detector needs the W1 queries to pass and the transfer queries not to. The second
table routes: a query that passes goes to the ``multi-head`` model, the others to ``linear-self``
(trained on the corpus alone), with the paired difference to knn and its bootstrap 95% CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from headwise.memory.cli import _load, _pseudo_training_set
from headwise.memory.datasets import embed
from headwise.memory.enhancer import load_enhancer
from headwise.memory.evaluate import bootstrap_ci, enhanced_retriever, knn_retriever, per_query_metrics
from headwise.memory.transfer import read_query_file, transfer_files


def density_scores(train: np.ndarray, shrink: float = 0.1):  # noqa: ANN201 - a closure
    mu = train.mean(0)
    cov = np.cov(train - mu, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    prec = np.linalg.inv(cov)
    return lambda x: -np.einsum("nd,de,ne->n", x - mu, prec, x - mu)  # higher: more like training


def classifier_scores(pos: np.ndarray, neg: np.ndarray, steps: int = 3000, seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    x = torch.tensor(np.concatenate([pos, neg]))
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    weight = torch.where(y > 0, 0.5 / len(pos), 0.5 / len(neg)) * len(y)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (512,), generator=gen)
        logits = model(x[idx]).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], reduction="none") * weight[idx]
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    model.eval()
    return lambda q: model(torch.tensor(q)).squeeze(-1).detach().numpy()


def main(directory: Path) -> None:
    _, ds, _, queries = _load(directory)
    held = sorted({d for part in ("validation", "test") for i in ds.split[part] for d in ds.relevant[i]})
    pseudo, _, p_tr, p_va = _pseudo_training_set(ds, 20000, 0, n_val=2000, exclude=held, option="probe")
    train = queries[ds.split["train"]]
    sets = {"W1 validation (threshold)": queries[ds.split["validation"]], "W1 test": queries[ds.split["test"]],
            "pseudo-queries (held out)": pseudo[p_va]}  # fmt: skip
    relevant = {"W1 test": [ds.relevant[i] for i in ds.split["test"]]}
    for path in transfer_files():
        qf = read_query_file(path, ds.doc_ids)
        sets[qf.name] = embed(qf.queries, progress=False)
        relevant[qf.name] = qf.relevant
    detectors = {"density": density_scores(train), "classifier": classifier_scores(train, pseudo[p_tr])}
    print("## Do the transfer queries look like the training queries? (share passing the 95% threshold)\n")
    print(f"Command: `.venv/bin/python scripts/ood_probe.py {directory}`\n")
    print("| query set | queries | " + " | ".join(detectors) + " |")
    print("|---|---|" + "---|" * len(detectors))
    thresholds = {n: np.quantile(f(sets["W1 validation (threshold)"]), 0.05) for n, f in detectors.items()}
    for name, emb in sets.items():
        shares = [f"{np.mean(f(emb) >= thresholds[n]):.3f}" for n, f in detectors.items()]
        print(f"| {name} | {len(emb):,} | " + " | ".join(shares) + " |")
    docs = np.load(directory / "docs.npy")
    models = {"knn": knn_retriever(docs)}
    for name in ("multi-head", "linear-self"):
        models[name] = enhanced_retriever(docs, load_enhancer(directory / "models" / name))
    print("\n## Routing: passing queries to multi-head, the others to linear-self (difference to knn)\n")
    print("| detector | query set | routed to multi-head | recall@10 | ndcg@10 |")
    print("|---|---|---|---|---|")
    for set_name, rel in relevant.items():
        per = {n: per_query_metrics(r(sets[set_name], 100), rel) for n, r in models.items()}
        for det, f in detectors.items():
            passes = f(sets[set_name]) >= thresholds[det]
            cells = []
            for metric in ("recall@10", "ndcg@10"):
                routed = np.where(passes, per["multi-head"][metric], per["linear-self"][metric])
                diff, lo, hi = bootstrap_ci(routed - per["knn"][metric])
                cells.append(f"{routed.mean():.3f} ({diff:+.4f} [{lo:+.4f}, {hi:+.4f}])")
            print(f"| {det} | {set_name} | {passes.mean():.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/wordnet"))
