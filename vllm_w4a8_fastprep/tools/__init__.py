"""The package's tools, which vLLM never loads: the command line (``cli``),
checks of W4AFP8 checkpoints (``checkpoint_check``), synthetic checkpoints
(``synthetic``), upstream vLLM's own preparation chain for comparisons
(``upstream``), the table of model weight shapes (``model_shapes``), one-line
errors (``errors``), the source revision of a measurement (``provenance``)
and the one lookup and loader of vLLM's compiled ops (``vllm_ops``). The serving half (what vLLM imports) is the package above;
nothing in it imports from here."""
