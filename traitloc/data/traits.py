"""Trait lists: the prompts a concept query asks about, with the body parts they refer to.

A trait list is a list of :class:`Trait` records. It comes from

- a built-in name (see :func:`available_trait_lists`; ``"cub200"`` is the 312 CUB-200-2011 attributes with
  readable prompts and the CUB part keypoints each attribute refers to),
- a CSV file with a ``prompt`` column and optional ``name`` (or ``attribute``), ``parts`` (semicolon-separated),
  ``attribute_id`` and ``group`` columns, or
- a plain ``.txt`` file with one prompt per line (blank lines and lines starting with ``#`` are skipped).

The CUB attribute -> part mapping (:data:`CUB_GROUP_PARTS`, :func:`attribute_parts`) is written down here once;
``scripts/make_cub_trait_list.py`` copies it into ``trait_lists/cub200_attributes.csv``. An empty part tuple
means "the whole bird" (size, shape and primary color are not tied to one keypoint).
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = [
    "CUB_GROUP_PARTS",
    "CUB_PARTS",
    "Trait",
    "attribute_parts",
    "available_trait_lists",
    "load_trait_list",
    "parse_attribute",
]

#: The 15 CUB-200-2011 part keypoints, in the order of ``CUB_200_2011/parts/parts.txt`` (part_id = index + 1).
CUB_PARTS: tuple[str, ...] = (
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
)

_WINGS = ("left wing", "right wing")
_EYES = ("left eye", "right eye")
_LEGS = ("left leg", "right leg")

#: CUB attribute group (``has_<part>_<property>``) -> the part keypoints it refers to, in :data:`CUB_PARTS`
#: order. ``()`` means the whole bird. Head patterns include the eyes because eyerings, eyelines, eyebrows and
#: masks are drawn around them; upperparts are the back, nape and crown, underparts the throat, breast and belly.
CUB_GROUP_PARTS: dict[str, tuple[str, ...]] = {
    "has_bill_shape": ("beak",),
    "has_wing_color": _WINGS,
    "has_upperparts_color": ("back", "crown", "nape"),
    "has_underparts_color": ("belly", "breast", "throat"),
    "has_breast_pattern": ("breast",),
    "has_back_color": ("back",),
    "has_tail_shape": ("tail",),
    "has_upper_tail_color": ("tail",),
    "has_head_pattern": ("crown", "forehead", "left eye", "nape", "right eye"),
    "has_breast_color": ("breast",),
    "has_throat_color": ("throat",),
    "has_eye_color": _EYES,
    "has_bill_length": ("beak",),
    "has_forehead_color": ("forehead",),
    "has_under_tail_color": ("tail",),
    "has_nape_color": ("nape",),
    "has_belly_color": ("belly",),
    "has_wing_shape": _WINGS,
    "has_size": (),
    "has_shape": (),
    "has_back_pattern": ("back",),
    "has_tail_pattern": ("tail",),
    "has_belly_pattern": ("belly",),
    "has_primary_color": (),
    "has_leg_color": _LEGS,
    "has_bill_color": ("beak",),
    "has_crown_color": ("crown",),
    "has_wing_pattern": _WINGS,
}

_BUILTIN_ALIASES: dict[str, str] = {"cub200": "cub200_attributes.csv"}
_SUFFIXES = (".csv", ".txt")


@dataclass(frozen=True)
class Trait:
    """One trait to localize.

    Parameters
    ----------
    name : str
        Stable identifier (for CUB the raw attribute name, e.g. ``has_wing_color::blue``; else the prompt).
    prompt : str
        The natural-language text given to the text encoder, e.g. ``"blue wings"``.
    parts : tuple of str
        Part keypoints the trait refers to (CUB part names); empty means the whole organism.
    attribute_id : int or None
        1-based CUB attribute id, when the trait is a CUB attribute.
    group : str or None
        Attribute group, e.g. ``has_wing_color``.
    """

    name: str
    prompt: str
    parts: tuple[str, ...] = ()
    attribute_id: int | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Trait name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"Trait prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.parts, tuple) or not all(isinstance(p, str) and p for p in self.parts):
            raise TypeError(f"Trait parts must be a tuple of non-empty strings, got {self.parts!r}")
        aid = self.attribute_id
        if aid is not None and (isinstance(aid, bool) or not isinstance(aid, int) or aid < 1):
            raise ValueError(f"Trait attribute_id must be a positive int or None, got {self.attribute_id!r}")
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise ValueError(f"Trait group must be a non-empty string or None, got {self.group!r}")


def parse_attribute(attribute_name: str) -> tuple[str, str]:
    """Split a CUB attribute name ``has_<part>_<property>::<value>`` into ``(group, value)``.

    Parameters
    ----------
    attribute_name : str
        E.g. ``"has_wing_color::blue"``.

    Returns
    -------
    tuple of str
        ``("has_wing_color", "blue")``.
    """
    if not isinstance(attribute_name, str):
        raise TypeError(f"attribute_name must be a str, got {type(attribute_name).__name__}")
    group, sep, value = attribute_name.strip().partition("::")
    if not sep or not group.startswith("has_") or not value:
        raise ValueError(f"not a CUB attribute name 'has_<part>_<property>::<value>': {attribute_name!r}")
    return group, value


def attribute_parts(attribute_name: str) -> tuple[str, ...]:
    """Part keypoints a CUB attribute refers to.

    Parameters
    ----------
    attribute_name : str
        A CUB attribute (``"has_wing_color::blue"``) or attribute group (``"has_wing_color"``).

    Returns
    -------
    tuple of str
        CUB part names in ``parts.txt`` order, e.g. ``("left wing", "right wing")``; ``()`` means the whole
        bird (``has_size``, ``has_shape``, ``has_primary_color``).
    """
    if not isinstance(attribute_name, str):
        raise TypeError(f"attribute_name must be a str, got {type(attribute_name).__name__}")
    group = parse_attribute(attribute_name)[0] if "::" in attribute_name else attribute_name.strip()
    try:
        return CUB_GROUP_PARTS[group]
    except KeyError:
        raise ValueError(
            f"unknown CUB attribute group {group!r}; known groups: {', '.join(sorted(CUB_GROUP_PARTS))}"
        ) from None


def _repo_trait_dir() -> Path | None:
    """The repository's top-level ``trait_lists/`` (a source checkout or editable install), if present."""
    folder = Path(__file__).resolve().parents[2] / "trait_lists"  # traitloc/data/traits.py -> the checkout
    return folder if folder.is_dir() else None


def _package_trait_dir() -> Path | Traversable | None:
    """Package data ``traitloc/trait_lists`` (an installed wheel), if present."""
    try:
        folder = resources.files("traitloc") / "trait_lists"
        return folder if folder.is_dir() else None
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):  # pragma: no cover - exotic loaders
        return None


def _builtin_files() -> dict[str, Path | Traversable]:
    """Map every built-in name (file stems and aliases) to its file; the first folder found wins (the repository's
    ``trait_lists/``, then package data)."""
    found: dict[str, Path | Traversable] = {}
    for folder in filter(None, (_repo_trait_dir(), _package_trait_dir())):
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if Path(entry.name).suffix.lower() in _SUFFIXES and entry.is_file():
                found.setdefault(Path(entry.name).stem, entry)
    for alias, filename in _BUILTIN_ALIASES.items():
        if Path(filename).stem in found:
            found[alias] = found[Path(filename).stem]
    return found


def available_trait_lists() -> list[str]:
    """Names of the built-in trait lists, e.g. ``["cub200"]``.

    Every ``.csv``/``.txt`` file in ``trait_lists/`` is available under its stem; files with a short alias
    (``cub200`` for ``cub200_attributes.csv``) are listed under the alias only (the stem still loads).
    """
    files = _builtin_files()
    aliased = {Path(f).stem for a, f in _BUILTIN_ALIASES.items() if a in files}
    return sorted(name for name in files if name not in aliased)


def _normalize_prompt(prompt: str) -> str:
    """Key under which two prompts count as the same (CLIP tokenizers lowercase and collapse whitespace)."""
    return re.sub(r"\s+", " ", prompt.strip()).lower()


def _parse_txt(text: str, source: str) -> list[Trait]:
    prompts = (line.strip() for line in text.splitlines())
    return [Trait(name=p, prompt=p) for p in prompts if p and not p.startswith("#")]


def _parse_csv(text: str, source: str) -> list[Trait]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise ValueError(f"{source}: trait list is empty (no CSV header)")
    columns = {c.strip().lower(): c for c in reader.fieldnames if c is not None}
    if "prompt" not in columns:
        raise ValueError(f"{source}: CSV has no 'prompt' column (columns: {', '.join(reader.fieldnames)})")
    name_col = columns.get("name", columns.get("attribute"))
    traits = []
    for row in reader:
        line = reader.line_num
        values = {key: (row.get(col) or "").strip() for key, col in columns.items()}
        if not any(values.values()):
            continue
        prompt = values["prompt"]
        if not prompt:
            raise ValueError(f"{source}, line {line}: empty prompt")
        name = (row.get(name_col) or "").strip() if name_col else ""
        attribute_id = _attribute_id(values.get("attribute_id"), f"{source}, line {line}")
        parts = tuple(p.strip() for p in values.get("parts", "").split(";") if p.strip())
        traits.append(Trait(name or prompt, prompt, parts, attribute_id, values.get("group") or None))
    return traits


def _attribute_id(text: str | None, where: str) -> int | None:
    """The ``attribute_id`` cell as an int >= 1 (``None`` when empty)."""
    if not text:
        return None
    try:
        attribute_id = int(text)
    except ValueError:
        raise ValueError(f"{where}: attribute_id must be an integer, got {text!r}") from None
    if attribute_id < 1:
        raise ValueError(f"{where}: attribute_id must be >= 1, got {attribute_id}")
    return attribute_id


def _dedupe(traits: list[Trait], source: str) -> list[Trait]:
    """Drop repeated prompts (keep the first, warn); refuse one name used for different prompts."""
    seen_prompts: set[str] = set()
    seen_names: dict[str, Trait] = {}
    dropped: list[str] = []
    for trait in traits:
        key = _normalize_prompt(trait.prompt)
        if key in seen_prompts:
            dropped.append(trait.prompt)
            continue
        if trait.name in seen_names:
            raise ValueError(
                f"{source}: trait name {trait.name!r} is used for two prompts "
                f"({seen_names[trait.name].prompt!r} and {trait.prompt!r})"
            )
        seen_prompts.add(key)
        seen_names[trait.name] = trait
    kept = list(seen_names.values())
    if dropped:
        shown = ", ".join(repr(p) for p in dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        warnings.warn(
            f"{source}: dropped {len(dropped)} duplicate prompt(s), keeping the first of each: {shown}",
            UserWarning,
            stacklevel=3,
        )
    return kept


def _parse(text: str, suffix: str, source: str) -> list[Trait]:
    parse = {".csv": _parse_csv, ".txt": _parse_txt}.get(suffix)
    if parse is None:
        raise ValueError(f"{source}: unsupported trait list format {suffix!r}; use a .csv or .txt file")
    traits = parse(text, source)
    if not traits:
        raise ValueError(f"{source}: trait list is empty")
    return _dedupe(traits, source)


def load_trait_list(name_or_path: str | os.PathLike[str]) -> list[Trait]:
    """Load a trait list from a built-in name, a CSV file or a text file.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A built-in name (:func:`available_trait_lists`, e.g. ``"cub200"``), or the path of a ``.csv`` file
        (needs a ``prompt`` column; optional ``name``/``attribute``, ``parts`` (``;``-separated),
        ``attribute_id``, ``group``) or of a ``.txt`` file (one prompt per line; blank lines and ``#`` comments
        skipped).

    Returns
    -------
    list of Trait
        In file order. Repeated prompts (compared case- and whitespace-insensitively, as CLIP tokenizes them)
        are dropped with a warning.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        Unknown built-in name, unsupported format, a CSV without a ``prompt`` column, or an empty list.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or os.PathLike, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if isinstance(name_or_path, str):
        if not name_or_path.strip():
            raise ValueError("trait list name or path must not be empty")
        builtins = _builtin_files()
        looks_like_path = path.suffix.lower() in _SUFFIXES or os.sep in name_or_path or "/" in name_or_path
        if name_or_path in builtins and not (looks_like_path and path.exists()):
            entry = builtins[name_or_path]
            source = f"built-in trait list {name_or_path!r} ({entry.name})"
            return _parse(entry.read_text(encoding="utf-8-sig"), Path(entry.name).suffix.lower(), source)
        if not looks_like_path and not path.exists():
            available = ", ".join(available_trait_lists()) or "none found"
            raise ValueError(
                f"unknown trait list {name_or_path!r}; built-in lists: {available} (or give a .csv/.txt path)"
            )
    if not path.exists():
        raise FileNotFoundError(f"trait list file not found: {path}")
    if not path.is_file():
        raise ValueError(f"trait list path is not a file: {path}")
    return _parse(path.read_text(encoding="utf-8-sig"), path.suffix.lower(), str(path))
