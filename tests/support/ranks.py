"""Processes for the ranks of the tests that run vLLM's layers in several processes (gloo on
the CPU, NCCL on GPUs).

Each rank imports vLLM's config, distributed and layer modules and this package's config and
MoE method: ~10 s of a 2-core machine's time per rank when each starts from nothing (a spawned
process). ``context()`` forks the ranks instead from one server process (multiprocessing's
"forkserver", one per test process, started on first use) that has imported ``PRELOAD`` once.
A rank forked from it is a new process, as a spawned one is, with those modules already
imported; the server imports nothing that initialises CUDA, so a rank may use a GPU. The ranks'
target functions are still looked up by module and name, as for spawn.

Unlike a spawned one, a rank gets the environment the server started with (the first
``context()`` user's), not the one of the test that starts it: a test that needs another
environment in its ranks passes it to them and sets it there. A module of ``PRELOAD`` that no
longer imports is skipped by the server without a word (the ranks then import it themselves):
tests/tools/test_ranks.py checks that each one imports."""

import torch

PRELOAD = ["torch", "vllm.config", "vllm.distributed", "vllm.model_executor.layers.linear",
           "vllm_w4a8_fastprep.config", "vllm_w4a8_fastprep.moe"]


def context():
    """The multiprocessing context for rank processes (the same server for every caller)."""
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx
