"""stepdistill: distil many-step diffusion models into one- and few-step generators.

``import stepdistill`` is light (no torch, no diffusers): the pipeline classes of exported folders are
registered with diffusers when diffusers is imported (at once if it already is), so that
``DiffusionPipeline.from_pretrained(folder)`` resolves them in either import order.
"""

import importlib.abc
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("stepdistill")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"


def _register():
    # Exported pipeline folders name our pipeline classes in model_index.json; registering them makes
    # DiffusionPipeline.from_pretrained(folder) resolve those names.
    from .pipelines import register_with_diffusers

    register_with_diffusers()


class _RegisterAfterDiffusersImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` right after ``diffusers`` itself has been imported (and then leaves
    ``sys.meta_path``). A mere ``importlib.util.find_spec("diffusers")`` (availability checks) imports nothing
    and leaves the hook in place."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "diffusers" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec("diffusers")  # the other finders' answer
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = exec_module
        return spec


if "diffusers" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterDiffusersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterDiffusersImport())


def __getattr__(name):
    if name == "GuidedUNet2DModel":  # diffusers loads a w-conditioned unet as ("stepdistill", "GuidedUNet2DModel")
        from .models.guided_unet import GuidedUNet2DModel

        return GuidedUNet2DModel
    raise AttributeError(f"module 'stepdistill' has no attribute {name!r}")


__all__ = ["GuidedUNet2DModel", "__version__"]
