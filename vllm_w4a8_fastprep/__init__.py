"""vllm-w4a8-fastprep: W4A8 (int4 weights, fp8 activations) weight and scale
preparation on the GPU for vLLM, bit-identical to upstream.

``register()`` is vLLM's ``vllm.general_plugins`` entry point: it registers
the quantization method ``w4a8_fastprep`` on a supported vLLM (see
``compat``); on any other it logs one line naming the supported range and
registers nothing. vLLM runs it in every process it starts, so it registers
a thin class (``registration``) that imports nothing of vLLM's
compressed-tensors or MoE stack; the real config (``config``) is imported
when vLLM builds one for a W4AFP8 checkpoint. Importing this package is
cheap (no vLLM, no CUDA); the ops live in ``vllm_w4a8_fastprep.ops``.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the ``w4a8_fastprep`` quantization config with vLLM.

    Safe to call any number of times, in any process; initialises no CUDA
    and imports none of vLLM's quantization methods or MoE layers (the
    registered class imports the real config in ``from_config``).
    On a vLLM outside the supported range it logs that, once, and registers
    nothing: vLLM then serves every checkpoint as it does without this package.
    """
    global _registered
    if _registered:
        return
    from . import compat

    problem = compat.vllm_version_problem()
    if problem is not None:
        import logging

        logging.getLogger("vllm.w4a8_fastprep").warning(problem)
        _registered = True
        return
    from .checkpoint_format import METHOD_NAME
    from .compat import register_quantization_config
    from .registration import W4A8FastPrepLazyConfig

    register_quantization_config(METHOD_NAME)(W4A8FastPrepLazyConfig)
    # --load-format w4a8_fastprep (opt-in): registered when vLLM imports its
    # model_loader package (not imported here: load_format.py says why)
    from .load_format import register_lazily

    register_lazily()
    _registered = True
