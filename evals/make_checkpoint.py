"""Write a W4AFP8 compressed-tensors checkpoint (pack-quantized).

    python -m evals.make_checkpoint synthetic OUT --preset 8b [--layers N] [--device cuda]
        Llama-shaped, random but valid tensors and an offline tokenizer, written straight in
        the checkpoint format (tiny / 1b / 8b / 70b presets; fast enough for tens of GB).
    python -m evals.make_checkpoint hf MODEL OUT
        A real Hugging Face model quantised with llm-compressor's W4AFP8 scheme
        (data-free QuantizationModifier). llm-compressor pins a newer compressed-tensors
        than vLLM 0.26, so install it in its own environment: pip install llmcompressor
"""

from __future__ import annotations

import argparse
import sys


def from_hf(model: str, out: str) -> None:
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
    except ImportError as e:
        raise SystemExit(f"make_checkpoint hf needs llm-compressor ({e}); install it in its "
                         "own environment: pip install llmcompressor") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model, torch_dtype="auto")
    tok = AutoTokenizer.from_pretrained(model)
    recipe = QuantizationModifier(targets="Linear", scheme="W4AFP8", ignore=["lm_head"])
    oneshot(model=m, recipe=recipe)
    m.save_pretrained(out, save_compressed=True, quantization_format="pack-quantized")
    tok.save_pretrained(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="source", required=True)
    s = sub.add_parser("synthetic", help="random Llama-shaped checkpoint from a preset")
    s.add_argument("out")
    s.add_argument("--preset", default="tiny", help="tiny, 1b, 8b, 70b")
    s.add_argument("--layers", type=int, help="override the preset's number of layers")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", help="where to draw the tensors (cuda is faster)")
    h = sub.add_parser("hf", help="quantise a Hugging Face model with llm-compressor")
    h.add_argument("model")
    h.add_argument("out")
    args = ap.parse_args(argv)
    if args.source == "synthetic":
        from vllm_w4a8_fastprep.synthetic import write_checkpoint

        path = write_checkpoint(args.out, args.preset, layers=args.layers, seed=args.seed,
                                device=args.device, progress=True)
        print(f"wrote {path}")
    else:
        from_hf(args.model, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
