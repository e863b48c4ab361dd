"""Find the learnable tensors a score callable uses, and rebuild it around copies of them.

The tiled kernel never stores the logits, so its backward recomputes them block by block
and must return the gradient of every tensor the score reads (ALiBi slopes, a curvature, a
bias computed from v). For a plain callable those tensors are found where Python keeps
what a function reads: closure cells, defaults (positional and keyword-only), module
globals named in its code, the arguments of a ``functools.partial``, and the parameters of
an ``nn.Module``. A tensor reached any other way (an attribute of some object, an item of
a list) is not found: subclass :class:`headwise.scores.Score` and list it in
``parameters()`` instead.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator

from torch import Tensor, nn
from torch.func import functional_call


def _cells(fn: types.FunctionType) -> Iterator:
    return (cell.cell_contents for cell in fn.__closure__ or () if _has(cell))


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _sources(fn: Callable) -> Iterator:
    """Every object the callable reads that may be (or hold) a learnable tensor."""
    if isinstance(fn, functools.partial):
        yield from fn.args
        yield from fn.keywords.values()
        yield from _sources(fn.func)
    elif isinstance(fn, nn.Module):
        yield from (p for p in fn.parameters())
    elif isinstance(fn, types.FunctionType):
        yield from _cells(fn)
        yield from fn.__defaults__ or ()
        yield from (fn.__kwdefaults__ or {}).values()
        g = fn.__globals__
        yield from (g[name] for name in sorted(_global_names(fn.__code__)) if name in g)


def captured_tensors(fn: Callable) -> tuple[Tensor, ...]:
    """The distinct tensors that need grad among what ``fn`` reads, in a stable order."""
    seen, out = set(), []
    for obj in _sources(fn):
        if isinstance(obj, Tensor) and obj.requires_grad and id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
    return tuple(out)


def rebind(fn: Callable, swap: dict[int, Tensor]) -> Callable:
    """A copy of ``fn`` reading ``swap[id(t)]`` wherever it read tensor ``t``."""

    def sub(x):
        return swap.get(id(x), x) if isinstance(x, Tensor) else x

    if isinstance(fn, functools.partial):
        return functools.partial(
            rebind(fn.func, swap), *map(sub, fn.args), **{k: sub(v) for k, v in fn.keywords.items()}
        )
    if isinstance(fn, nn.Module):
        params = {name: sub(p) for name, p in fn.named_parameters()}
        return lambda *args: functional_call(fn, params, args)
    if isinstance(fn, types.FunctionType):
        cells = tuple(types.CellType(sub(c)) for c in _cells(fn)) if fn.__closure__ else None
        if cells is not None and len(cells) != len(fn.__closure__):
            cells = tuple(
                types.CellType() if not _has(c) else types.CellType(sub(c.cell_contents)) for c in fn.__closure__
            )
        names = _global_names(fn.__code__)
        g = fn.__globals__
        if any(isinstance(g.get(n), Tensor) and id(g[n]) in swap for n in names):
            g = dict(g)  # a private namespace: the caller's module globals stay untouched
            for n in names:
                if n in g:
                    g[n] = sub(g[n])
        defaults = tuple(map(sub, fn.__defaults__)) if fn.__defaults__ else None
        clone = types.FunctionType(fn.__code__, g, fn.__name__, defaults, cells)
        clone.__kwdefaults__ = {k: sub(v) for k, v in fn.__kwdefaults__.items()} if fn.__kwdefaults__ else None
        return clone
    return fn


def _has(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises ValueError
    except ValueError:
        return False
    return True
