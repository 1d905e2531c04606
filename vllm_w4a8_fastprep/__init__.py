"""vllm-w4a8-fastprep: fast, bit-exact W4A8 weight preparation for vLLM."""

__version__ = "0.1.0"
