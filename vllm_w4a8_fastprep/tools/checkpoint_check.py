"""The one validator of W4AFP8 checkpoint folders, used by both
``vllm-w4a8-fastprep prepare`` and ``evals.make_checkpoint check``.

``inspect(folder)`` reads ``config.json`` and the safetensors headers (no
tensor data beyond each layer's small ``weight_shape``) and raises
``OneLineError`` naming the first problem: status 2 when the folder is not a
W4AFP8 checkpoint at all (no config, no W4AFP8 config group, no W4AFP8
layer, unreadable JSON), status 1 for a damaged one (a tensor missing, of the
wrong dtype or shape, a truncated file, a MoE layer without all of its
experts). Which layers are W4AFP8 is decided per layer from the config groups
(ignore list, name targets, class targets), as vLLM's compressed-tensors
config decides. ``scale_problem`` judges the values of one layer's group
scales (NaN or inf scales serve NaN outputs).
"""

from __future__ import annotations

import json
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .. import safetensors_header
from ..checkpoint_format import GROUP_SIZE, SHAPE_MULTIPLE, checkpoint_problem
from .errors import USAGE, OneLineError

# the per-expert projections of a MoE layer, as checkpoints name them
# (Qwen/DeepSeek style; Mixtral style w1/w3/w2)
EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\."
                    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")
GATE, UP, DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")
ROLES = ("gate", "up", "down")
# config.json keys holding the number of routed experts per layer
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TORCH_NAMES = {  # safetensors' dtype -> torch's name (widths: safetensors_header.DTYPE_BITS)
    "BOOL": "torch.bool", "U8": "torch.uint8", "I8": "torch.int8",
    "F8_E4M3": "torch.float8_e4m3fn", "F8_E5M2": "torch.float8_e5m2", "I16": "torch.int16",
    "U16": "torch.uint16", "F16": "torch.float16", "BF16": "torch.bfloat16",
    "I32": "torch.int32", "U32": "torch.uint32", "F32": "torch.float32", "I64": "torch.int64",
    "U64": "torch.uint64", "F64": "torch.float64",
}


def _dtype_name(dtype: str) -> str:
    return TORCH_NAMES.get(dtype, dtype)


@dataclass
class TensorInfo:
    file: Path
    dtype: str  # safetensors' name: I32, BF16, ...
    shape: list[int]
    begin: int  # byte offsets of the data in the file
    end: int

    def read_ints(self) -> list[int]:
        """The values of a small I32/I64 tensor (e.g. ``weight_shape``)."""
        fmt = {"I32": "i", "I64": "q"}[self.dtype]
        with open(self.file, "rb") as f:
            f.seek(self.begin)
            data = f.read(self.end - self.begin)
        return list(struct.unpack(f"<{len(data) // struct.calcsize(fmt)}{fmt}", data))


# ------------------------------------------------------------ reading


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise OneLineError(f"{path}: cannot read it ({e.strerror or e})", USAGE) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OneLineError(f"{path}: not valid JSON ({e})", USAGE) from None
    if not isinstance(data, dict):
        raise OneLineError(f"{path}: not a JSON object", USAGE)
    return data


def _kind(path: Path, status: int = 1) -> str | None:
    """"file", "folder", "other" or None (nothing there) for ``path``; one
    line where it cannot be looked at (a folder on the way that may not be
    searched, a loop of symbolic links), not pathlib's exception."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise OneLineError(f"{path}: cannot look at it ({e.strerror or e})", status) from None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def read_header(path: Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of one safetensors file, checked as safetensors
    checks it (``safetensors_header``)."""
    kind = _kind(path)
    if kind is None:
        raise OneLineError(f"{path}: no such file")
    if kind != "file":
        raise OneLineError(f"{path}: not a file (a safetensors file was expected)")
    try:
        tensors = safetensors_header.read_header(str(path))
    except safetensors_header.HeaderError as e:
        raise OneLineError(f"{path}: {e}") from None
    return {name: TensorInfo(path, t.dtype, list(t.shape), t.start, t.end)
            for name, t in tensors.items()}


def read_tensors(ckpt: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint: through the index when there is one
    (each named tensor must be in the file it names), else every
    ``*.safetensors`` file."""
    index = ckpt / "model.safetensors.index.json"
    headers: dict[str, dict[str, TensorInfo]] = {}
    if _kind(index, USAGE) is not None:
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise OneLineError(f"{index}: no 'weight_map' object of file names", USAGE)
        out = {}
        for name, fname in wm.items():
            if fname not in headers:
                path = ckpt / fname
                if _kind(path) is None:
                    raise OneLineError(f"{path}: no such file (named in the index for {name})")
                headers[fname] = read_header(path)
            if name not in headers[fname]:
                raise OneLineError(f"{ckpt / fname}: has no tensor {name} (the index says it "
                                   "does)")
            out[name] = headers[fname][name]
        return out
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise OneLineError(f"{ckpt}: no *.safetensors files and no model.safetensors.index.json",
                           USAGE)
    out = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in out:
                raise OneLineError(f"{ckpt}: tensor {name} is in both {out[name].file.name} "
                                   f"and {f.name}")
            out[name] = info
    return out


# ------------------------------------------------- which layers are W4AFP8


def _matches_name(name: str, target: str) -> bool:
    """A layer name against one target: exact, or a ``re:`` regex."""
    from compressed_tensors.utils.match import match_name

    return match_name(name, target)


def _matches_class(target: str) -> bool:
    """A class target: every tensor with a ``weight_packed`` belongs to a
    Linear (experts included), and vLLM matches a target against its layer
    classes (``*Linear``) by substring."""
    return not target.startswith("re:") and target.lower() in ("linear", "linearbase")


def check_patterns(qcfg: dict) -> None:
    """Every ``re:`` entry of the ignore list and the targets must compile."""
    groups = qcfg.get("config_groups") or {}
    entries = [("ignore", t) for t in qcfg.get("ignore") or []] + [
        (f"config_groups.{g}.targets", t) for g, spec in groups.items()
        if isinstance(spec, dict) for t in spec.get("targets") or []]
    for where, t in entries:
        if not isinstance(t, str):
            raise OneLineError(f"quantization_config {where}: entry {t!r} is not a string", USAGE)
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise OneLineError(f"quantization_config {where}: {t!r} is not a valid regular "
                                   f"expression ({e})", USAGE) from None


def layer_scheme(name: str, qcfg: dict) -> tuple[str | None, str | None]:
    """(config group, None) if layer ``name`` is W4AFP8, else (group or
    None, why not). The ignore list first, then name targets, then class
    targets, as vLLM's compressed-tensors config decides."""
    if any(_matches_name(name, t) for t in qcfg.get("ignore") or []):
        return None, "in the config's ignore list"
    groups = qcfg.get("config_groups") or {}
    targets = [(g, t) for g, spec in groups.items() for t in spec.get("targets") or []]
    hit = next((g for g, t in targets if _matches_name(name, t)), None) or next(
        (g for g, t in targets if _matches_class(t)), None)
    if hit is None:
        return None, "no config group targets it"
    # the group judged alone, by the same rules as the whole checkpoint
    why = checkpoint_problem({**qcfg, "config_groups": {hit: groups[hit]}})
    return hit, why


@dataclass
class Dense:
    name: str


@dataclass
class MoE:
    name: str  # ...mlp.experts
    experts: dict[int, dict[str, str]] = field(default_factory=dict)  # e -> role -> prefix


@dataclass
class Plan:
    dense: list[Dense]
    moe: list[MoE]
    skipped: list[tuple[str, str]]  # (layer, why)


def expert_count(config: dict) -> int | None:
    """Routed experts per layer as the model's config.json states it."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            for key in EXPERT_COUNT_KEYS:
                v = cfg.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def plan_layers(names, qcfg: dict, experts: int | None = None) -> Plan:
    """The W4AFP8 layers among tensor ``names``: dense ones, and MoE layers
    with their experts by role; each MoE layer must hold every expert
    (0..experts-1 when the config states ``experts``) with all three
    projections."""
    check_patterns(qcfg)
    prefixes = sorted(n[: -len(".weight_packed")] for n in names if n.endswith(".weight_packed"))
    dense, moe, skipped = [], {}, []
    for p in prefixes:
        _, why = layer_scheme(p, qcfg)
        m = EXPERT.match(p)
        if why is not None:
            skipped.append((p, why))
        elif m:
            role = ("gate" if m["proj"] in GATE else "up" if m["proj"] in UP else "down")
            layer = moe.setdefault(m["layer"], MoE(m["layer"]))
            layer.experts.setdefault(int(m["expert"]), {})[role] = p
        else:
            dense.append(Dense(p))
    for layer in moe.values():  # a W4AFP8 MoE layer must be whole
        ids = sorted(layer.experts)
        for e in ids:
            missing = [r for r in ROLES if r not in layer.experts[e]]
            if missing:
                raise OneLineError(f"{layer.name}: expert {e} has no W4AFP8 {missing[0]} "
                                   f"projection (its weight_packed is missing or not W4AFP8)")
        want = experts if experts is not None else ids[-1] + 1
        absent = sorted(set(range(want)) - set(ids))
        extra = [e for e in ids if e >= want]
        said = f"the config says {experts}" if experts is not None else "experts numbered"
        if absent:
            raise OneLineError(f"{layer.name}: expert {absent[0]} is missing ({said}; the "
                               f"checkpoint holds {len(ids)}: {ids[0]}..{ids[-1]}"
                               + (f", {len(absent)} missing" if len(absent) > 1 else "") + ")")
        if extra:
            raise OneLineError(f"{layer.name}: expert {extra[0]} is beyond the config's "
                               f"{experts} experts")
    return Plan(dense, list(moe.values()), skipped)


# ------------------------------------------------------- the tensors


def check_linear(tensors: dict[str, TensorInfo], prefix: str) -> tuple[int, int]:
    """One W4AFP8 linear's weight_packed / weight_scale / weight_shape:
    dtypes, shapes, agreement; returns its (N, K)."""
    w = tensors[prefix + ".weight_packed"]
    if w.dtype != "I32":
        raise OneLineError(f"{prefix}: weight_packed must be torch.int32 (8 uint4b8 values per "
                           f"int32), got {_dtype_name(w.dtype)}")
    if len(w.shape) != 2:
        raise OneLineError(f"{prefix}: weight_packed must be 2-D [N, K/8], got shape "
                           f"{tuple(w.shape)}")
    if 0 in w.shape:
        raise OneLineError(f"{prefix}: weight_packed is empty (shape {tuple(w.shape)})")
    n, k = w.shape[0], 8 * w.shape[1]
    for value, what in ((n, "N (output features, dim 0)"), (k, "K (input features, 8 x dim 1)")):
        if value % SHAPE_MULTIPLE:
            raise OneLineError(f"{prefix}: weight_packed: {what} = {value} is not a multiple of "
                               f"{SHAPE_MULTIPLE} (vLLM's CUTLASS W4A8 kernel needs K and N multiples "
                               f"of {SHAPE_MULTIPLE})")
    s = tensors.get(prefix + ".weight_scale")
    if s is None:
        raise OneLineError(f"{prefix}: has weight_packed but no weight_scale")
    if s.dtype != "BF16":
        raise OneLineError(f"{prefix}: weight_scale must be torch.bfloat16 (the checkpoint's "
                           f"group scales), got {_dtype_name(s.dtype)}")
    want = (n, k // GROUP_SIZE)
    if tuple(s.shape) != want:
        raise OneLineError(f"{prefix}: weight_scale has shape {tuple(s.shape)} but weight_packed "
                           f"[N, K/8] = {tuple(w.shape)} needs [N, K/{GROUP_SIZE}] = {want} "
                           f"(group size {GROUP_SIZE})")
    ws = tensors.get(prefix + ".weight_shape")
    if ws is None:
        raise OneLineError(f"{prefix}: has weight_packed but no weight_shape")
    if ws.dtype not in ("I32", "I64") or ws.shape != [2]:
        raise OneLineError(f"{prefix}: weight_shape must be 2 integers [N, K], got "
                           f"{_dtype_name(ws.dtype)} of shape {tuple(ws.shape)}")
    shape = ws.read_ints()
    if shape != [n, k]:
        raise OneLineError(f"{prefix}: weight_shape {shape} does not match weight_packed "
                           f"{list(w.shape)} (needs [N, K] = {[n, k]})")
    return n, k


def check_moe(tensors: dict[str, TensorInfo], layer: MoE) -> None:
    """Every expert's projections valid (``check_linear``), gate and up of
    one shape, down their transpose, every expert of one shape."""
    first = None
    for e in sorted(layer.experts):
        shapes = {r: check_linear(tensors, layer.experts[e][r]) for r in ROLES}
        if shapes["gate"] != shapes["up"]:
            raise OneLineError(f"{layer.name}: expert {e}: gate [N, K] = {list(shapes['gate'])} "
                               f"and up {list(shapes['up'])} differ")
        if shapes["down"] != shapes["gate"][::-1]:
            raise OneLineError(f"{layer.name}: expert {e}: down [N, K] = {list(shapes['down'])} "
                               f"does not fit gate/up {list(shapes['gate'])} (needs "
                               f"{list(shapes['gate'][::-1])})")
        if first is None:
            first = (e, shapes)
        elif shapes != first[1]:
            raise OneLineError(f"{layer.name}: expert {e}'s projections are gate/up [N, K] = "
                               f"{list(shapes['gate'])}, expert {first[0]}'s "
                               f"{list(first[1]['gate'])} (one shape for all experts)")


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    qcfg: dict
    tensors: dict[str, TensorInfo]
    plan: Plan

    @property
    def units(self) -> list[str]:
        return [d.name for d in self.plan.dense] + [m.name for m in self.plan.moe]


def inspect(folder: str | Path) -> Checkpoint:
    """The checkpoint in ``folder``, validated; ``OneLineError`` otherwise."""
    folder = Path(folder)
    kind = _kind(folder, USAGE)
    if kind != "folder":
        raise OneLineError(f"{folder}: no such folder" if kind is None
                           else f"{folder}: not a folder", USAGE)
    if _kind(folder / "config.json", USAGE) != "file":
        raise OneLineError(f"{folder} is not a model folder (no config.json)", USAGE)
    config = read_json(folder / "config.json")
    qcfg = config.get("quantization_config")
    problem = checkpoint_problem(qcfg)
    if problem is not None:
        raise OneLineError(f"{folder} is not a W4AFP8 compressed-tensors checkpoint: {problem}",
                           USAGE)
    tensors = read_tensors(folder)
    plan = plan_layers(tensors, qcfg, expert_count(config))
    if not plan.dense and not plan.moe:
        first = f" (e.g. {plan.skipped[0][0]}: {plan.skipped[0][1]})" if plan.skipped else ""
        raise OneLineError(f"{folder} has no W4AFP8 layers{first}", USAGE)
    for d in plan.dense:
        check_linear(tensors, d.name)
    for m in plan.moe:
        check_moe(tensors, m)
    return Checkpoint(folder, config, qcfg, tensors, plan)


# ------------------------------------------------------------ values


def scale_problem(prefix: str, scale) -> str | None:
    """None if every group scale of ``scale`` (a torch tensor) is finite;
    else a line naming the layer and the count (NaN or inf scales make the
    layer's outputs NaN)."""
    import torch

    bad = int((~torch.isfinite(scale)).sum().item())
    if not bad:
        return None
    return (f"{prefix}: weight_scale has {bad} non-finite value{'s' if bad > 1 else ''} "
            f"(NaN or inf) of {scale.numel()}")


def scan_scales(ck: Checkpoint) -> list[str]:
    """``scale_problem`` of every W4AFP8 linear (experts included), read on
    the CPU one file at a time."""
    from safetensors import safe_open

    prefixes = [d.name for d in ck.plan.dense] + [
        p for m in ck.plan.moe for roles in m.experts.values() for p in roles.values()]
    by_file: dict[Path, list[str]] = {}
    for p in prefixes:
        by_file.setdefault(ck.tensors[p + ".weight_scale"].file, []).append(p)
    problems = []
    for path, names in sorted(by_file.items()):
        try:
            with safe_open(str(path), "pt") as h:
                for p in names:
                    why = scale_problem(p, h.get_tensor(p + ".weight_scale"))
                    if why:
                        problems.append(why)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise OneLineError(f"{path}: cannot read the scales ({type(e).__name__}: {e})") \
                from None
    return problems
