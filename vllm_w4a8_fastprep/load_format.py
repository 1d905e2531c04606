"""Registering the opt-in load format ``w4a8_fastprep`` with vLLM, cheaply.

vLLM looks a load format up in its ``model_loader`` package's registry
(``register_model_loader``) when a worker loads the model. Importing that
package costs a vLLM process 0.4-1.3 s (its loaders and their imports), and
vLLM loads general plugins in every process it starts (``vllm serve --help``
too), so ``register()`` does not import it: it registers the format at once
where vLLM has already imported the package, and otherwise the moment vLLM
imports it (a one-shot import hook; nothing else is touched). The loader
itself lives in ``block_loader.py``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

LOAD_FORMAT = "w4a8_fastprep"
#: the vLLM package whose registry holds the load formats
MODEL_LOADER = "vllm.model_executor.model_loader"

logger = logging.getLogger("vllm.w4a8_fastprep")
_state = {"registered": False, "hook": None}


def register_now() -> None:
    """Register the load format (imports vLLM's model_loader package)."""
    if _state["registered"]:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from .block_loader import W4A8FastPrepModelLoader

    register_model_loader(LOAD_FORMAT)(W4A8FastPrepModelLoader)
    _state["registered"] = True


def _loader_module_half_made() -> bool:
    """Whether ``block_loader`` is being imported (it imports vLLM's
    model_loader package before its class exists)."""
    module = sys.modules.get(f"{__package__}.block_loader")
    return module is not None and not hasattr(module, "W4A8FastPrepModelLoader")


def _try_register() -> None:
    if _loader_module_half_made():
        _state["deferred"] = True  # block_loader registers it once its class exists
        return
    try:
        register_now()
    except Exception as e:  # noqa: BLE001 - never break vLLM's own import
        logger.warning("%s: the load format %s could not be registered (%s: %s); "
                       "--load-format %s is then unknown to vLLM", LOAD_FORMAT, LOAD_FORMAT,
                       type(e).__name__, e, LOAD_FORMAT)


def _register_after_import() -> None:
    hook = _state["hook"]
    if hook is not None and hook in sys.meta_path:
        sys.meta_path.remove(hook)
    _state["hook"] = None
    _try_register()


def loader_defined() -> None:
    """``block_loader``'s last line: the registration that vLLM's import
    of its model_loader package asked for while ``block_loader`` itself was
    being imported (its import of vLLM's loaders set that off), now that
    the class exists."""
    if _state.pop("deferred", False):
        _try_register()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds vLLM's model_loader package as the other finders do and runs
    the registration right after the package has executed."""

    def __init__(self):
        self.busy = False

    def find_spec(self, fullname, path, target=None):
        if fullname != MODEL_LOADER or self.busy or _state["registered"]:
            return None
        self.busy = True  # the lookup below asks the finders again, this one included
        try:
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            run = spec.loader.exec_module  # this spec's own loader object

            def exec_module(module):
                run(module)
                if module.__name__ == MODEL_LOADER:
                    _register_after_import()

            spec.loader.exec_module = exec_module
            return spec
        except Exception as e:  # noqa: BLE001 - never break vLLM's own import
            logger.warning("%s: cannot watch for vLLM's model loaders (%s: %s); --load-format "
                           "%s is then unknown to vLLM", LOAD_FORMAT, type(e).__name__, e,
                           LOAD_FORMAT)
            return None  # the other finders find the package as usual
        finally:
            self.busy = False


def register_lazily() -> None:
    """Make ``--load-format w4a8_fastprep`` known to this process's vLLM:
    now if vLLM has imported its model_loader package, else when it does.
    Idempotent."""
    if _state["registered"] or _state["hook"] is not None:
        return
    if MODEL_LOADER in sys.modules:
        _register_after_import()
        return
    hook = _AfterImport()
    _state["hook"] = hook
    sys.meta_path.insert(0, hook)
