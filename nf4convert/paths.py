"""Path safety: names read from files (indexes, manifests) must stay inside their folder."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


def is_plain_relative(name: object) -> bool:
    """True for a relative POSIX path with no ``..``, no backslash and no empty or absolute part."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    pure = PurePosixPath(name)
    return not pure.is_absolute() and ".." not in pure.parts


def is_inside(path: Path, root: Path) -> bool:
    """True if ``path`` resolves (symlinks followed) inside ``root``."""
    return path.resolve().is_relative_to(root.resolve())
