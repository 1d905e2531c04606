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

vLLM's registry does not hold this class: importing it imports vLLM's
compressed-tensors and MoE stack, and vLLM loads plugins in every process.
It holds ``registration.W4A8FastPrepLazyConfig``, whose ``from_config``
returns an instance of this class; which checkpoints are claimed
(``override_quantization_method``) is decided there, for both.
"""

from __future__ import annotations

import logging
from typing import Any

from .checkpoint_format import METHOD_NAME, scheme_problem
from .compat import CompressedTensorsConfig, RoutedExperts
from .load_stats import LoadStats
from .logs import log_once
from .registration import claim

logger = logging.getLogger("vllm.w4a8_fastprep")


def _get_moe_method(config, layer, prefix: str):
    """This package's MoE method for ``layer``, None for upstream's handling."""
    try:
        from .moe import get_moe_method
    except ImportError as e:  # the MoE module is not part of this install
        log_once(logging.INFO, "no-moe", "%s: no MoE support here (%s); MoE layers get "
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
        """The registered class's answer (``registration.claim``)."""
        return claim(hf_quant_cfg, user_quant)

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
