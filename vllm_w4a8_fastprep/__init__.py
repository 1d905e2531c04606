"""vllm-w4a8-fastprep: W4A8 (int4 weights, fp8 activations) weight and scale
preparation on the GPU for vLLM, bit-identical to upstream.

``register()`` is vLLM's ``vllm.general_plugins`` entry point: it registers
the quantization method ``w4a8_fastprep``. Importing this package is cheap
(no vLLM, no CUDA); the ops live in ``vllm_w4a8_fastprep.ops``.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the ``w4a8_fastprep`` quantization config with vLLM.

    Safe to call any number of times, in any process; initialises no CUDA.
    """
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .checkpoint_format import METHOD_NAME
    from .config import W4A8FastPrepConfig

    register_quantization_config(METHOD_NAME)(W4A8FastPrepConfig)
    _registered = True
