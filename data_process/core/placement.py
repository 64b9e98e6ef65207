"""Image placement: the one way a new dataset folder finds the images of its source.

Record image paths are relative to their dataset folder. When a step writes a new folder (``prepare`` from a
release, ``enrich`` and ``caption`` from a unified dataset), the images are not moved; :func:`place_images` makes
the new folder's paths resolve, in one of three modes:

* ``symlink`` (default everywhere): each linked folder becomes a symbolic link to its absolute source folder; paths
  stay as they are, nothing is copied.
* ``copy``: each *referenced* file is copied (a self-contained folder that survives moving the source).
* ``rewrite``: nothing is made; each path is rewritten relative to the new folder, pointing at the source file.

:func:`place_record_images` does it for unified records: it returns them with each image path as the new folder
reaches it. ``links`` maps a folder *inside the new dataset* (``images`` or ``images/mention``) to the source folder it stands
for: a release reader gives it; for a unified source dataset (``src_root``) it is the dataset's top-level image
folders (:func:`dataset_links`). Absolute paths are kept; a path of a unified source that leaves its folder
(``../x.jpg``) is always rewritten. An existing entry in
the new folder is never removed: a link to the same source is kept, anything else is an error naming it.
``copy`` and ``rewrite`` read each file through :func:`source_file`: a file whose real path leaves its linked source
folder (a symlink pointing out) is refused with :class:`~data_process.core.safe_paths.UnsafePath` (the release
readers leave such images out before, and list them).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping

from data_process.core.records import Entity, Mention
from data_process.core.safe_paths import resolve_in_dataset

PLACEMENT_MODES = ("symlink", "copy", "rewrite")


def dataset_links(src_root: str | Path, rel_paths: Iterable[str]) -> dict[str, Path]:
    """``{top-level folder: source folder}`` for the image paths of a unified dataset at ``src_root``."""
    tops = {Path(p).parts[0] for p in rel_paths if p and not Path(p).is_absolute()} - {"..", "."}
    return {top: Path(src_root) / top for top in sorted(tops) if (Path(src_root) / top).exists()}


def source_file(folder: str | Path, rest: str, *, folder_links: bool = True) -> Path:
    """The real path of the file ``rest`` (a relative path) names under the source folder ``folder``, or
    :class:`UnsafePath` when, symlinks resolved, it leaves ``folder`` (which may itself be a link). With
    ``folder_links`` a folder link directly inside ``folder`` is a source folder of its own (a unified dataset's
    ``images/mention -> /abs/source``, as prepare makes it): the file must stay inside that link's target."""
    return resolve_in_dataset(folder, rest, folder_links=1 if folder_links else 0)


def _link_of(rel: str, links: Mapping[str, Path]) -> tuple[str, str] | None:
    """``(linked folder, the rest of rel)`` for the longest linked folder ``rel`` lies under."""
    for folder in sorted(links, key=len, reverse=True):
        prefix = folder.rstrip("/") + "/"
        if rel.startswith(prefix):
            return folder, rel[len(prefix):]
    return None


def _make_link(link: Path, target: Path) -> None:
    target = target.resolve()
    if link.is_symlink() or link.exists():
        if link.is_symlink() and link.resolve() == target:
            return
        raise FileExistsError(f"{link}: exists and is not a link to {target}; choose an empty output folder")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())


def place_images(out_root: str | Path, rel_paths: Iterable[str | None], mode: str = "symlink", *,
                 src_root: str | Path | None = None, links: Mapping[str, str | Path] | None = None
                 ) -> dict[str, str]:
    """Make ``rel_paths`` resolve from ``out_root`` (see the module docstring); returns ``{old path: new path}``.

    Give ``src_root`` (a unified source dataset) or ``links`` (a release reader's folders). A path under no linked
    folder is kept as it is (a missing image stays missing, for validation to report)."""
    if mode not in PLACEMENT_MODES:
        raise ValueError(f"images mode must be one of {', '.join(PLACEMENT_MODES)}, got {mode!r}")
    rel_paths = list(dict.fromkeys(p for p in rel_paths if p))
    if links is None:
        if src_root is None:
            raise ValueError("place_images needs src_root or links")
        links = dataset_links(src_root, rel_paths)
    out_root = Path(out_root)
    out_abs = out_root.resolve()
    links = {k.rstrip("/"): Path(v) for k, v in links.items()}
    mapping: dict[str, str] = {}
    linked: set[str] = set()
    for rel in rel_paths:
        if Path(rel).is_absolute():
            mapping[rel] = rel
            continue
        hit = _link_of(rel, links)
        if hit is None:
            leaves = src_root is not None and Path(rel).parts[0] == ".."
            mapping[rel] = os.path.relpath(Path(src_root).resolve() / rel, out_abs) if leaves else rel
            continue
        folder, rest = hit
        if mode == "rewrite":
            mapping[rel] = os.path.relpath(source_file(links[folder], rest), out_abs)
        elif mode == "symlink":
            mapping[rel] = rel
            if folder not in linked:
                linked.add(folder)
                _make_link(out_root / folder, links[folder])
        else:
            mapping[rel] = rel
            source = source_file(links[folder], rest)     # UnsafePath when a symlink leads out of the folder
            if source.is_file():
                dest = out_root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)
    return mapping


def record_image_paths(entities: Iterable[Entity], mentions: Iterable[Mention]) -> list[str]:
    """Every image path the records name: the mentions' images, then the entities'."""
    return [m.image for m in mentions if m.image] + [p for e in entities for p in e.images]


def place_record_images(out_root: str | Path, entities: Iterable[Entity], mentions: Iterable[Mention],
                        mode: str = "symlink", *, src_root: str | Path | None = None,
                        links: Mapping[str, str | Path] | None = None) -> tuple[list[Entity], list[Mention]]:
    """:func:`place_images` for the image paths of ``entities`` and ``mentions``; returns the records with their
    paths as ``out_root`` reaches them (the same records when no path changes)."""
    entities, mentions = list(entities), list(mentions)
    mapping = place_images(out_root, record_image_paths(entities, mentions), mode, src_root=src_root, links=links)
    if all(old == new for old, new in mapping.items()):
        return entities, mentions
    return ([replace(e, images=tuple(mapping[p] for p in e.images)) if e.images else e for e in entities],
            [replace(m, image=mapping[m.image]) if m.image else m for m in mentions])
