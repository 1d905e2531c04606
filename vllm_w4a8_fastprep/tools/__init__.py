"""The package's tools, which vLLM never loads: the command line (``cli``),
checks of W4AFP8 checkpoints (``checkpoint_check``), synthetic checkpoints
(``synthetic``), upstream vLLM's own preparation chain for comparisons
(``upstream``), the table of model weight shapes (``model_shapes``), one-line
errors (``errors``) and the source revision of a measurement
(``provenance``). The serving half (what vLLM imports) is the package above;
nothing in it imports from here."""
