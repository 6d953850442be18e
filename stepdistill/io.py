"""Writes that never lose a user's files: every file or folder that replaces another is written beside it
under a temporary name, flushed to disk (the file, then its folder), and renamed into place; a folder is
swapped with the one it replaces (``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else two renames),
so an interruption leaves either the old or the new version, never nothing.

Export folders carry a marker file (:data:`EXPORT_MARKER`): only a folder holding it (a previous stepdistill
export) is ever replaced; any other non-empty folder is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil

from .config import ConfigError

EXPORT_MARKER = ".stepdistill_export"


# ------------------------------------------------------------------------------------------------- syncing
def fsync_dir(path: str) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:  # some platforms / file systems cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str) -> None:
    """fsync every file and folder under ``root`` (files first), then ``root`` itself."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(here, name))
        fsync_dir(here)


# ------------------------------------------------------------------------------------------------- files
def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp{os.getpid()}")


def atomic_write(path: str, write) -> str:
    """Replace ``path`` with what ``write(tmp_path)`` writes: temp file beside it, fsync, rename, fsync the
    folder."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)
    return path


def write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_json(path: str, obj, **kw) -> str:
    kw.setdefault("indent", 2)
    return write_text(path, json.dumps(obj, **kw) + "\n")


def save_safetensors(tensors: dict, path: str, metadata=None) -> str:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def torch_save(obj, path: str) -> str:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- folders
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2); False when the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def remove_dir(path: str) -> None:
    """Delete a folder so that it disappears at once: renamed to a hidden name first, then removed (a kill
    during the removal leaves a hidden leftover, never a half-deleted folder under the real name)."""
    if not os.path.lexists(path):
        return
    head, tail = os.path.split(path)
    doomed = os.path.join(head, f".{tail}.deleting{os.getpid()}")
    os.replace(path, doomed)
    fsync_dir(head or ".")
    shutil.rmtree(doomed, ignore_errors=True)


def swap_dir(tmp: str, final: str) -> None:
    """Put the complete folder ``tmp`` at ``final``, replacing what was there. ``tmp`` must be fsynced."""
    head = os.path.dirname(final) or "."
    if not os.path.lexists(final):
        os.replace(tmp, final)
    elif _exchange(tmp, final):  # final now holds the new folder, tmp the old one
        fsync_dir(head)
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # two renames: between them the old folder is still there under its hidden name
        old = os.path.join(head, f".{os.path.basename(final)}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(head)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(head)


def _partial_name(final: str) -> str:
    head, tail = os.path.split(os.path.abspath(final.rstrip("/") or final))
    return os.path.join(head, f".{tail}.partial")


def begin_dir(final: str) -> str:
    """A fresh, empty temp folder beside ``final`` to write its new content into (see :func:`finish_dir`)."""
    tmp = _partial_name(final)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write
    os.makedirs(tmp)
    return tmp


def finish_dir(tmp: str, final: str, marker: dict | None = None) -> str:
    """Write ``marker`` (the export marker file, if given), fsync the tree and swap it in at ``final``."""
    if marker is not None:
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
            json.dump(marker, f, indent=2)
    fsync_tree(tmp)
    swap_dir(tmp, os.path.abspath(final))
    return final


@contextlib.contextmanager
def staged_dir(final: str, marker: dict | None = None):
    """``with staged_dir(final) as tmp:`` write the folder's content into ``tmp`` (beside ``final``); on a
    clean exit the tree is fsynced and swapped into place. ``marker`` (a dict) is written as the export
    marker file. On an error ``tmp`` is removed and ``final`` is left as it was."""
    tmp = begin_dir(final)
    try:
        yield tmp
        finish_dir(tmp, final, marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------- exports
def check_export_dir(path: str, key: str = "export_dir") -> None:
    """Refuse to export to ``path`` when it is a file, or a non-empty folder that is not a previous
    stepdistill export (no marker file). A previous export is replaced (by :func:`staged_dir`)."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: {path!r} exists and is not a folder; choose another {key}")
    if os.listdir(path) and not os.path.isfile(os.path.join(path, EXPORT_MARKER)):
        raise ConfigError(
            f"{key}: folder {path!r} is not empty and is not a previous stepdistill export (no {EXPORT_MARKER} "
            f"file); stepdistill replaces only its own exports: choose another {key} or empty that folder"
        )


def export_marker(kind: str, **info) -> dict:
    from . import __version__

    return {"written_by": "stepdistill", "version": __version__, "kind": kind, **info}


@contextlib.contextmanager
def export_folder(path: str, kind: str, key: str = "export_dir", **info):
    """Write an export folder: refused over a foreign non-empty folder, staged beside ``path``, marked, and
    swapped in (a previous export at ``path`` stays in place until the new one is complete)."""
    check_export_dir(path, key)
    with staged_dir(path, marker=export_marker(kind, **info)) as tmp:
        yield tmp


def begin_export(path: str, key: str = "export_dir") -> str:
    """The temp folder to write an export of ``path`` into (refused over a foreign folder); then
    :func:`finish_export`."""
    check_export_dir(path, key)
    return begin_dir(path)


def finish_export(tmp: str, path: str, kind: str, **info) -> str:
    return finish_dir(tmp, path, marker=export_marker(kind, **info))
