"""What went wrong while a model's checkpoint tensors were loaded into the
layers this package prepares, collected so that a load fails once, with one
error that names every bad tensor, instead of at vLLM's first assert.

The layer schemes (``scheme.py``, ``moe.py``) check each checkpoint tensor's
shape against what the layer expects for that parameter, shard and expert
before vLLM's weight loader sees it (shapes are metadata: no device sync, for
CPU- and GPU-resident tensors alike); a tensor that does not fit is not
loaded and recorded here. The first layer whose ``process_weights_after_loading``
runs afterwards raises :class:`LoadError` listing every layer's problems
(vLLM loads every tensor of a model before it processes any layer). During
vLLM's layer-wise reload (the loaders see the layer's parameters on the meta
device while vLLM buffers the tensors) the first tensor that does not fit
raises at once: vLLM would otherwise skip a layer none of whose tensors
loaded and keep its old weights, without an error.
"""

from __future__ import annotations

import inspect
import os
import re
import weakref

from .checkpoint_format import METHOD_NAME

#: at most this many layers are named in one error (the rest are counted)
MAX_LAYERS_IN_ERROR = 8


def env_flag(name: str, default: bool) -> bool:
    """A yes/no environment switch: 1/true/yes/on, 0/false/no/off (any
    case); unset, empty or anything else is ``default``."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


class LoadError(ValueError):
    """A checkpoint tensor that this package's layers cannot serve."""


def weak_callable(fn):
    """A callable returning ``fn`` without keeping its object alive, for
    loaders stored on parameters: vLLM keeps meta copies of every parameter
    (with their attributes) for reloading, in a dictionary weak on the layer
    only, so a loader closure holding the layer's bound method would keep the
    layer and its GPU tensors alive after the model is gone."""
    if inspect.ismethod(fn):
        ref = weakref.WeakMethod(fn)

        def get():
            got = ref()
            if got is None:
                raise RuntimeError(f"{METHOD_NAME}: the layer of this weight loader was freed")
            return got

        return get
    return lambda: fn


def id_ranges(ids) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3, 7"``."""
    ids = sorted(set(int(i) for i in ids))
    out, start, prev = [], None, None
    for i in ids + [None]:
        if start is not None and (i is None or i != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(out)


_NUM = re.compile(r"\d+")


def name_ranges(names) -> str:
    """Layer names with their first number folded into ranges:
    ``model.layers.0.mlp.experts`` ... ``model.layers.47.mlp.experts`` ->
    ``model.layers.0-47.mlp.experts``."""
    groups: dict[str, list[int]] = {}
    plain: list[str] = []
    for name in dict.fromkeys(names):
        m = _NUM.search(name)
        if m is None:
            plain.append(name)
            continue
        key = name[:m.start()] + "\0" + name[m.end():]
        groups.setdefault(key, []).append(int(m.group()))
    parts = []
    for key, nums in groups.items():
        r = id_ranges(nums)
        parts.append(key.replace("\0", r if "," not in r else "{" + r + "}"))
    return ", ".join(parts + plain)


class LoadProblems:
    """Problems found while loading, by layer name, in the order found.

    ``add(layer, problem, expert=None)`` records one; problems that differ
    only in the expert are reported once, with the experts as ranges."""

    def __init__(self) -> None:
        self._by_layer: dict[str, dict[str, list[int]]] = {}

    def add(self, layer: str, problem: str, expert: int | None = None) -> None:
        experts = self._by_layer.setdefault(layer, {}).setdefault(problem, [])
        if expert is not None:
            experts.append(int(expert))

    def __bool__(self) -> bool:
        return bool(self._by_layer)

    def layers(self) -> list[str]:
        return list(self._by_layer)

    def describe(self, layer: str) -> list[str]:
        out = []
        for problem, experts in self._by_layer.get(layer, {}).items():
            if experts:
                n = len(set(experts))
                which = f"expert{'s' if n > 1 else ''} {id_ranges(experts)}"
                out.append(f"{which}: {problem}")
            else:
                out.append(problem)
        return out

    def clear(self) -> None:
        self._by_layer.clear()

    def error(self, layer: str, kind: str, extra: list[str] = ()) -> LoadError:
        """One error for the whole load: ``layer`` (being processed, of
        ``kind`` "layer"/"MoE layer") first with ``extra`` (its own problems
        found at processing), then every other layer with problems."""
        own = self.describe(layer) + list(extra)
        if own:
            text = f"{METHOD_NAME}: {kind} {layer} cannot be served: " + "; ".join(own)
        else:
            text = f"{METHOD_NAME}: checkpoint tensors do not fit the model's layers"
        others = [n for n in self._by_layer if n != layer]
        if others:
            shown = others[:MAX_LAYERS_IN_ERROR]
            text += ("; also " if own else ": ") + "; ".join(
                f"layer {n}: " + "; ".join(self.describe(n)) for n in shown)
            if len(others) > len(shown):
                text += f"; and {len(others) - len(shown)} more layers"
        return LoadError(text)
