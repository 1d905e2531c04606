"""Evaluation tools: synthetic/real W4AFP8 checkpoints, startup time and
output identity (ours vs upstream), gsm8k through lm-eval."""
