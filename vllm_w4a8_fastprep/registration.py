"""The class that ``register()`` gives vLLM as the quantization method
``w4a8_fastprep``: cheap to import, so that registering costs nothing where
no W4AFP8 checkpoint is served.

vLLM loads general plugins in every process it starts (the API server
front-end, ``vllm serve --help``, the engine core, every worker), for
unquantized models too. The real config, ``config.W4A8FastPrepConfig``, is
a subclass of vLLM's ``CompressedTensorsConfig``; importing it imports vLLM's
compressed-tensors package, its fused-MoE stack and this package's scheme
and MoE method (seconds of CPU time). This class answers what vLLM asks of
the registered class itself and imports the real config only in
``from_config``:

* ``override_quantization_method`` (``ModelConfig._verify_quantization``,
  for every checkpoint that has a ``quantization_config``): judged from
  ``checkpoint_format`` alone, which claims W4AFP8 compressed-tensors
  checkpoints (the logic lives here; the real config uses the same);
* ``get_config_filenames`` (``weight_utils.get_quant_config``): none, as for
  ``compressed-tensors`` (the quantization config is read from config.json);
* ``from_config`` (``weight_utils.get_quant_config``): the real config.

vLLM asks everything else (``get_name``, ``get_min_capability``,
``get_supported_act_dtypes``, ``get_quant_method``, ...) of the instance
that ``from_config`` returns; the class-level answers here are the same as
the real config's (a test compares them).

Importing this module imports vLLM's quantization registry
(``vllm.model_executor.layers.quantization`` and its ``base_config``, which
imports transformers); every vLLM process imports those for its own config
before it loads plugins.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .checkpoint_format import METHOD_NAME, checkpoint_problem
from .compat import QuantizationConfig
from .logs import log_once, logger

AUTO_ENV = "VLLM_W4A8_FASTPREP_AUTO"
#: The name the real config reports (``get_name()``): upstream's.
UPSTREAM_NAME = "compressed-tensors"


def auto_claim_enabled() -> bool:
    return os.environ.get(AUTO_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def name_gated_problem(hf_quant_cfg: dict) -> str | None:
    """Why vLLM would treat this checkpoint differently under a name other
    than ``compressed-tensors`` (so it is not claimed automatically)."""
    fmt = str(hf_quant_cfg.get("format") or "")
    if "nvfp4" in fmt.lower():
        return (f"its format is {fmt!r}: vLLM enables NVFP4 fusion defaults only for "
                "--quantization compressed-tensors (ModelConfig.is_nvfp4_quantized)")
    return None


def _serves_only_w4afp8(problem: str) -> str:
    return (f"--quantization {METHOD_NAME} serves llm-compressor W4AFP8 checkpoints "
            "(compressed-tensors, pack-quantized, int4 group-128 symmetric weights, "
            f"dynamic per-token fp8 activations), but this model has: {problem}")


def claim(hf_quant_cfg: dict, user_quant: str | None) -> str | None:
    """``override_quantization_method``: ``w4a8_fastprep`` for a W4AFP8
    checkpoint (asked for, or automatically unless ``VLLM_W4A8_FASTPREP_AUTO=0``),
    None to leave the checkpoint to vLLM; asked for on another checkpoint,
    an error saying why not."""
    problem = checkpoint_problem(hf_quant_cfg)
    if user_quant == METHOD_NAME:
        if problem is not None:
            raise ValueError(_serves_only_w4afp8(problem))
        gated = name_gated_problem(hf_quant_cfg)
        if gated is not None:
            logger.warning("%s: serving as asked, but %s", METHOD_NAME, gated)
        return METHOD_NAME
    if user_quant is None and problem is None and auto_claim_enabled():
        gated = name_gated_problem(hf_quant_cfg)
        if gated is not None:
            log_once(logging.INFO, f"gated:{gated}", "%s: not claiming this W4AFP8 "
                     "checkpoint automatically: %s (pass --quantization %s to use it)",
                     METHOD_NAME, gated, METHOD_NAME)
            return None
        # where a layer cannot take the GPU path, the scheme's fallback warning says so
        log_once(logging.INFO, "claimed", "%s: serving this W4AFP8 compressed-tensors "
                 "checkpoint with this package's weight preparation (set %s=0 to use "
                 "vLLM's own path)", METHOD_NAME, AUTO_ENV)
        return METHOD_NAME
    return None


class W4A8FastPrepLazyConfig(QuantizationConfig):
    """``w4a8_fastprep`` as vLLM's registry holds it: ``from_config`` returns
    the real config (``config.W4A8FastPrepConfig``), imported then."""

    def __init__(self):
        # vLLM constructs a registered class without arguments only where the
        # model has no quantization_config at all (get_quant_config, for a
        # method without config files); compressed-tensors needs one
        raise ValueError(_serves_only_w4afp8(checkpoint_problem(None)))

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        from .config import W4A8FastPrepConfig

        return W4A8FastPrepConfig.from_config(config)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict, user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        return claim(hf_quant_cfg, user_quant)

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        return []

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @classmethod
    def get_supported_act_dtypes(cls) -> list:
        import torch  # vLLM has imported it

        return [torch.float32, torch.float16, torch.bfloat16]

    def get_name(self) -> str:
        return UPSTREAM_NAME

    def get_quant_method(self, layer, prefix: str):
        raise NotImplementedError(f"{type(self).__name__} is never instantiated: vLLM "
                                  "gets the real config from from_config")
