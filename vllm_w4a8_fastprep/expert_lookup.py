"""The expert-name lookup of vLLM's MoE weight loading, indexed.

vLLM before 0.31.0 (``RoutedExperts.load_weights``) tests every checkpoint
tensor's name against every entry of the layer's expert mapping (3 entries
per expert and more for fused checkpoints: 387 for 128 experts) with a
substring test and no early exit: for a Qwen3-30B-A3B-shaped model 56k
tensors x 387 entries, ~1.4 s of a load. 0.31.0 indexes the mapping by expert.

For the layers this package serves, ``install`` gives the layer an instance
``load_weights`` that runs vLLM's own, one tensor at a time, with the
mapping narrowed to exactly the entries whose checkpoint name is a substring
of that tensor's name, in their order: the entries vLLM's loop would have
acted on, so what is loaded, where and what is reported stay vLLM's. 3-D
(fused) tensors keep the whole mapping: vLLM's loop stops at the end of the
first run of matching entries for them, which a narrowed list would not show.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Iterable, Iterator

#: every per-expert checkpoint name in vLLM's expert mapping starts so
PREFIX = "experts."


class ExpertMappingIndex:
    """An expert mapping (``(param_name, weight_name, expert_id, shard_id)``
    entries) indexed by ``weight_name``; ``matches(name)`` are the entries
    whose ``weight_name`` is a substring of ``name``, in mapping order."""

    def __init__(self, mapping: Iterable[tuple]):
        self.mapping = list(mapping)
        self._by_name: dict[str, list[int]] = {}
        self._other: list[int] = []  # names not starting with PREFIX: tested one by one
        for i, entry in enumerate(self.mapping):
            name = entry[1]
            if name.startswith(PREFIX):
                self._by_name.setdefault(name, []).append(i)
            else:
                self._other.append(i)
        self._lengths = sorted({len(name) for name in self._by_name})

    def matches(self, name: str) -> list[tuple]:
        # a weight_name starting with PREFIX occurs in name exactly where name
        # has PREFIX and the following characters spell it
        found = {i for i in self._other if self.mapping[i][1] in name}
        at = name.find(PREFIX)
        while at != -1:
            for length in self._lengths:
                hit = self._by_name.get(name[at:at + length])
                if hit is not None:
                    found.update(hit)
            at = name.find(PREFIX, at + 1)
        return [self.mapping[i] for i in sorted(found)]


def upstream_indexes_experts() -> bool:
    """Whether the installed vLLM indexes the expert mapping itself (0.31.0+)."""
    module = importlib.import_module("vllm.model_executor.layers.fused_moe.routed_experts")
    return hasattr(module, "_index_expert_mapping")


def install(layer) -> bool:
    """Give ``layer`` (vLLM's ``RoutedExperts``) the indexed lookup; False
    (nothing changed) where vLLM indexes it itself or the layer lacks what
    the lookup needs. Holds the layer weakly (no reference cycle through it)."""
    cls = type(layer)
    if (upstream_indexes_experts() or not hasattr(layer, "layer_name")
            or not callable(getattr(cls, "get_expert_mapping", None))
            or not callable(getattr(cls, "load_weights", None))):
        return False
    ref = weakref.ref(layer)
    narrowed: list = []  # [entries] while vLLM's load_weights starts on one tensor
    # the layer's mapping, indexed once per MoE config of the layer (the
    # mapping depends on it and the checkpoint names only; elastic expert
    # parallelism replaces the config): callers that pass one tensor per call
    # (weight syncs) would otherwise pay its construction per tensor
    indexed: dict = {}

    def get_expert_mapping(*args, **kwargs):
        if narrowed and not args and kwargs == {"include_fused": True}:
            return narrowed[0]
        return cls.get_expert_mapping(ref(), *args, **kwargs)

    def load_weights(weights: Iterable[tuple[str, "torch.Tensor"]]) -> Iterator[str]:  # noqa: F821
        owner = ref()
        config = getattr(owner, "moe_config", None)
        index = indexed.get("index") if indexed.get("config") is config else None
        if index is None:
            index = ExpertMappingIndex(cls.get_expert_mapping(owner, include_fused=True))
            indexed.update(config=config, index=index)
        for name, tensor in weights:
            if tensor.dim() == 3:  # fused: vLLM's loop as it is
                yield from cls.load_weights(owner, [(name, tensor)])
                continue
            narrowed.append(index.matches(f"{owner.layer_name}.{name}"))
            try:
                run = cls.load_weights(owner, [(name, tensor)])
                first = next(run, None)  # vLLM's body asks for the mapping first
            finally:
                narrowed.clear()
            if first is not None:
                yield first
                yield from run

    layer.get_expert_mapping = get_expert_mapping
    layer.load_weights = load_weights
    return True
