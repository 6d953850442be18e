"""stepdistill: distil many-step diffusion models into one- and few-step generators."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("stepdistill")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"


def _register():
    # Exported pipeline folders name our pipeline classes in model_index.json; registering them makes
    # DiffusionPipeline.from_pretrained(folder) resolve those names once stepdistill is imported.
    from .pipelines import register_with_diffusers

    register_with_diffusers()


_register()

from .models.guided_unet import GuidedUNet2DModel  # noqa: E402

__all__ = ["GuidedUNet2DModel", "__version__"]
