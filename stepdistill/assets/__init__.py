"""Files shipped with the package: the digits teacher and the FD-digits classifier."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def digits_teacher_path() -> str:
    """The bundled class-conditional digits teacher (diffusers ``unet/`` + ``scheduler/``)."""
    path = ASSETS / "digits_teacher"
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"bundled digits teacher missing at {path}; recreate it with "
            "`stepdistill train --config recipes/teacher/digits.yaml` (see its README)"
        )
    return str(path)
