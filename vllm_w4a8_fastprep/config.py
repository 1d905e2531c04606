"""The quantization config ``w4a8_fastprep``: vLLM's compressed-tensors config
whose W4AFP8 layers use this package's scheme (dense layers) and MoE method
(``moe.get_moe_method``); every other layer goes to upstream's own
compressed-tensors handling.

Where vLLM 0.26.0 decides something by the quantization's name, a user gets
upstream's behaviour:

* ``quant_config.get_name()`` is upstream's ``"compressed-tensors"`` (the
  config is upstream's, only some layers' methods differ), so the
  name-gated code paths (vision towers quantized in ``gemma4_mm.py`` and
  ``diffusion_gemma.py``, the MFU metrics' bytes per weight in ``perf.py``)
  take the compressed-tensors branch. ``--quantization`` and
  ``model_config.quantization`` stay ``w4a8_fastprep``: that is how vLLM
  picks this class.
* ``ModelConfig.is_nvfp4_quantized`` (compilation fusion defaults) compares
  ``model_config.quantization`` with ``"compressed-tensors"``: checkpoints
  whose top-level format is NVFP4 are therefore not claimed automatically.
* ROCm's allow-list of quantization names: vLLM's
  ``register_quantization_config`` adds ``w4a8_fastprep`` to it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .checkpoint_format import METHOD_NAME, checkpoint_problem, scheme_problem
from .compat import CompressedTensorsConfig, RoutedExperts
from .load_stats import LoadStats

logger = logging.getLogger("vllm.w4a8_fastprep")
AUTO_ENV = "VLLM_W4A8_FASTPREP_AUTO"
_logged: set[str] = set()


def auto_claim_enabled() -> bool:
    return os.environ.get(AUTO_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _log_once(level: int, key: str, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def name_gated_problem(hf_quant_cfg: dict) -> str | None:
    """Why vLLM would treat this checkpoint differently under a name other
    than ``compressed-tensors`` (so it is not claimed automatically)."""
    fmt = str(hf_quant_cfg.get("format") or "")
    if "nvfp4" in fmt.lower():
        return (f"its format is {fmt!r}: vLLM enables NVFP4 fusion defaults only for "
                "--quantization compressed-tensors (ModelConfig.is_nvfp4_quantized)")
    return None


def _get_moe_method(config, layer, prefix: str):
    """This package's MoE method for ``layer``, None for upstream's handling."""
    try:
        from .moe import get_moe_method
    except ImportError as e:  # the MoE module is not part of this install
        _log_once(logging.INFO, "no-moe", "%s: no MoE support here (%s); MoE layers get "
                  "upstream's compressed-tensors handling", METHOD_NAME, e)
        return None
    return get_moe_method(config, layer, prefix)


class W4A8FastPrepConfig(CompressedTensorsConfig):
    """compressed-tensors W4AFP8 checkpoints, prepared on the GPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_stats = LoadStats()

    def get_name(self) -> str:
        """Upstream's name, ``compressed-tensors``: vLLM gates behaviour on
        ``quant_config.get_name()`` (see the module docstring); the
        ``--quantization`` name of this config is ``w4a8_fastprep``."""
        return CompressedTensorsConfig.get_name(self)

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
            gated = name_gated_problem(hf_quant_cfg)
            if gated is not None:
                logger.warning("%s: serving as asked, but %s", METHOD_NAME, gated)
            return METHOD_NAME
        if user_quant is None and problem is None and auto_claim_enabled():
            gated = name_gated_problem(hf_quant_cfg)
            if gated is not None:
                _log_once(logging.INFO, f"gated:{gated}", "%s: not claiming this W4AFP8 "
                          "checkpoint automatically: %s (pass --quantization %s to use it)",
                          METHOD_NAME, gated, METHOD_NAME)
                return None
            # where a layer cannot take the GPU path, the scheme's fallback warning says so
            _log_once(logging.INFO, "claimed", "%s: serving this W4AFP8 compressed-tensors "
                      "checkpoint with this package's weight preparation (set %s=0 to use "
                      "vLLM's own path)", METHOD_NAME, AUTO_ENV)
            return METHOD_NAME
        return None

    def get_quant_method(self, layer, prefix: str):
        if isinstance(layer, RoutedExperts):
            method = _get_moe_method(self, layer, prefix)
            if method is not None:
                return method
        return super().get_quant_method(layer, prefix)

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
