"""
How ``import ream_modifiers`` registers the modifiers with llm-compressor without
importing llm-compressor itself: the package stays light (``ream-compress check``
reads checkpoint headers only, and works where llm-compressor is not installed),
and the registration runs the moment llm-compressor is imported, or at once if it
already is.

llm-compressor resolves recipe class names through ``ModifierFactory``, which
has no plugin entry points, so the registration must run in this process before
a recipe is parsed; every process that imports ``ream_modifiers`` and then
llm-compressor (in either order) gets it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

from loguru import logger

__all__ = ["register", "register_when_imported"]

_TARGET = "llmcompressor"


def register() -> None:
    """
    Register every modifier of the method registry with llm-compressor's
    ``ModifierFactory`` (idempotent), and make its sequential pipeline calibrate
    with causal attention masks (:mod:`ream_modifiers.causal_calibration`) and
    linearize Llama-4's experts into our input-weighted class.
    """
    from llmcompressor.modifiers.factory import ModifierFactory

    import ream_modifiers.modifiers  # noqa: F401  (each method folder registers)
    from ream_modifiers import causal_calibration
    from ream_modifiers.modifiers.calibrate import ExpertStatisticsModifier
    from ream_modifiers.moe.expert_sets import register_set_width_experts
    from ream_modifiers.moe.input_weighted import register_input_weighted_experts
    from ream_modifiers.registry import methods

    for cls in [*(method.modifier for method in methods()), ExpertStatisticsModifier]:
        if ModifierFactory._registered_registry.get(cls.__name__) is not cls:
            ModifierFactory.register(cls.__name__, cls)
    causal_calibration.install()
    register_input_weighted_experts()
    register_set_width_experts()


class _RegisterAfterLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds llm-compressor with the other finders; runs :func:`register` once
    its package has executed (its submodules are importable then)."""

    def __init__(self) -> None:
        self._loader: Any = None

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot: the real finders take it from here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module keeps the real loader (resource readers, reloads)
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        try:
            register()
        except ImportError:
            # one of our own modules imported llm-compressor half-way through its
            # own import; registering now would need that module whole
            _register_on_first_create()
        except Exception as error:  # noqa: BLE001 - never break the user's import
            logger.warning(
                f"ream_modifiers could not register its modifiers with "
                f"llm-compressor ({error!r}); call ream_modifiers.register()"
            )


def _register_on_first_create() -> None:
    """Register when llm-compressor first resolves a recipe class name."""
    from llmcompressor.modifiers.factory import ModifierFactory

    from ream_modifiers import causal_calibration
    from ream_modifiers.moe.expert_sets import register_set_width_experts
    from ream_modifiers.moe.input_weighted import register_input_weighted_experts

    causal_calibration.install()  # imports nothing of ours: safe now
    register_input_weighted_experts()
    register_set_width_experts()
    original = ModifierFactory.__dict__["create"]

    def create(*args: Any, **kwargs: Any):
        ModifierFactory.create = original
        register()
        return ModifierFactory.create(*args, **kwargs)

    ModifierFactory.create = staticmethod(create)


def register_when_imported() -> None:
    """Register now if llm-compressor is loaded, else as soon as it is."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLoad())
