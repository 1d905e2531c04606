"""The quantization config ``w4a8_fastprep``: vLLM's compressed-tensors config
whose W4AFP8 layers use this package's scheme; every other layer goes to
upstream's own compressed-tensors handling."""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)

from .checkpoint_format import METHOD_NAME, checkpoint_problem, scheme_problem
from .load_stats import LoadStats

logger = logging.getLogger("vllm.w4a8_fastprep")
AUTO_ENV = "VLLM_W4A8_FASTPREP_AUTO"
_claimed_logged = False


def auto_claim_enabled() -> bool:
    return os.environ.get(AUTO_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class W4A8FastPrepConfig(CompressedTensorsConfig):
    """compressed-tensors W4AFP8 checkpoints, prepared on the GPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_stats = LoadStats()

    def get_name(self) -> str:
        return METHOD_NAME

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict, user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        problem = checkpoint_problem(hf_quant_cfg)
        if user_quant == METHOD_NAME:
            if problem is not None:
                raise ValueError(
                    f"--quantization {METHOD_NAME} serves llm-compressor W4AFP8 checkpoints "
                    "(compressed-tensors, pack-quantized, int4 group-128 symmetric weights, "
                    f"dynamic per-token fp8 activations), but this model has: {problem}")
            return METHOD_NAME
        if user_quant is None and problem is None and auto_claim_enabled():
            global _claimed_logged
            if not _claimed_logged:
                _claimed_logged = True
                logger.info("%s: serving this W4AFP8 compressed-tensors checkpoint with GPU "
                            "weight preparation (set %s=0 to use vLLM's own path)",
                            METHOD_NAME, AUTO_ENV)
            return METHOD_NAME
        return None

    def _get_scheme_from_parts(self, weight_quant, input_quant, output_quant=None,
                               format=None, layer_name=None):
        fmt = format if format is not None else self.quant_format
        problem = scheme_problem(weight_quant, input_quant, fmt)
        if problem is None and output_quant is None:
            from .scheme import W4A8FastPrepScheme

            return W4A8FastPrepScheme(self.load_stats, layer_name)
        scheme = super()._get_scheme_from_parts(
            weight_quant, input_quant, output_quant=output_quant, format=format,
            layer_name=layer_name)
        logger.info("%s: %s is not W4AFP8 (%s); using upstream's %s", METHOD_NAME, layer_name,
                    problem or "has output activation quantization", type(scheme).__name__)
        return scheme
