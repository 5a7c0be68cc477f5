#!/usr/bin/env python
"""Write ``trait_lists/cub200_attributes.csv``: the 312 CUB-200-2011 attributes as readable CLIP prompts.

Usage::

    python scripts/make_cub_trait_list.py /path/to/attributes.txt [-o trait_lists/cub200_attributes.csv] [--check]

``attributes.txt`` is CUB's ``<attribute_id> has_<part>_<property>::<value>`` list (beside or inside
``CUB_200_2011/``). The output is deterministic (same input, same bytes). Every group and every non-color value
must be known to the tables below, so a new or misspelled attribute fails loudly instead of becoming a bad
prompt. The part mapping comes from :data:`traitloc.data.traits.CUB_GROUP_PARTS` (written down once, there).
``--check`` compares with the existing file instead of writing it (exit status 1 when they differ).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from traitloc.data.traits import CUB_GROUP_PARTS, parse_attribute  # noqa: E402

COLUMNS = ("attribute_id", "attribute", "group", "value", "prompt", "parts")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "trait_lists" / "cub200_attributes.csv"

#: CUB color values as they read in a prompt ("buff" alone reads as "muscular").
COLORS = {
    "black": "black",
    "blue": "blue",
    "brown": "brown",
    "buff": "buff-colored",
    "green": "green",
    "grey": "grey",
    "iridescent": "iridescent",
    "olive": "olive",
    "orange": "orange",
    "pink": "pink",
    "purple": "purple",
    "red": "red",
    "rufous": "rufous",
    "white": "white",
    "yellow": "yellow",
}

#: Color groups: the noun, and whether it is plural (no article).
COLOR_NOUNS: dict[str, tuple[str, bool]] = {
    "has_wing_color": ("wings", True),
    "has_eye_color": ("eyes", True),
    "has_leg_color": ("legs", True),
    "has_upperparts_color": ("upperparts", True),
    "has_underparts_color": ("underparts", True),
    "has_back_color": ("back", False),
    "has_breast_color": ("breast", False),
    "has_throat_color": ("throat", False),
    "has_forehead_color": ("forehead", False),
    "has_nape_color": ("nape", False),
    "has_belly_color": ("belly", False),
    "has_bill_color": ("bill", False),
    "has_crown_color": ("crown", False),
    "has_upper_tail_color": ("upper tail", False),
    "has_under_tail_color": ("under tail", False),
}

PATTERN_NOUNS = {
    "has_breast_pattern": "breast",
    "has_back_pattern": "back",
    "has_tail_pattern": "tail",
    "has_belly_pattern": "belly",
    "has_wing_pattern": "wing",
}
PATTERNS = {"solid": "solid", "spotted": "spotted", "striped": "striped", "multi-colored": "multi-colored"}

FIXED: dict[str, dict[str, str]] = {
    "has_bill_shape": {
        "curved_(up_or_down)": "a bill curved up or down",
        "dagger": "a dagger-shaped bill",
        "hooked": "a hooked bill",
        "needle": "a needle-shaped bill",
        "hooked_seabird": "a hooked seabird bill",
        "spatulate": "a spatulate bill",
        "all-purpose": "an all-purpose bill",
        "cone": "a cone-shaped bill",
        "specialized": "a specialized bill",
    },
    "has_tail_shape": {
        "forked_tail": "a forked tail",
        "rounded_tail": "a rounded tail",
        "notched_tail": "a notched tail",
        "fan-shaped_tail": "a fan-shaped tail",
        "pointed_tail": "a pointed tail",
        "squared_tail": "a squared tail",
    },
    "has_head_pattern": {
        "spotted": "a spotted head",
        "malar": "a malar stripe",
        "crested": "a crested head",
        "masked": "a masked face",
        "unique_pattern": "a uniquely patterned head",
        "eyebrow": "an eyebrow stripe",
        "eyering": "an eye ring",
        "plain": "a plain head",
        "eyeline": "an eye line",
        "striped": "a striped head",
        "capped": "a capped head",
    },
    "has_bill_length": {
        "about_the_same_as_head": "a bill about the same length as the head",
        "longer_than_head": "a bill longer than the head",
        "shorter_than_head": "a bill shorter than the head",
    },
    "has_wing_shape": {
        "rounded-wings": "rounded wings",
        "pointed-wings": "pointed wings",
        "broad-wings": "broad wings",
        "tapered-wings": "tapered wings",
        "long-wings": "long wings",
    },
    "has_size": {
        "very_small_(3_-_5_in)": "a very small bird (3 - 5 inches)",
        "small_(5_-_9_in)": "a small bird (5 - 9 inches)",
        "medium_(9_-_16_in)": "a medium-sized bird (9 - 16 inches)",
        "large_(16_-_32_in)": "a large bird (16 - 32 inches)",
        "very_large_(32_-_72_in)": "a very large bird (32 - 72 inches)",
    },
    "has_shape": {
        "upright-perching_water-like": "an upright-perching water bird",
        "chicken-like-marsh": "a chicken-like marsh bird",
        "long-legged-like": "a long-legged bird",
        "duck-like": "a duck-like bird",
        "owl-like": "an owl-like bird",
        "gull-like": "a gull-like bird",
        "hummingbird-like": "a hummingbird-like bird",
        "pigeon-like": "a pigeon-like bird",
        "tree-clinging-like": "a tree-clinging bird",
        "hawk-like": "a hawk-like bird",
        "sandpiper-like": "a sandpiper-like bird",
        "upland-ground-like": "an upland ground bird",
        "swallow-like": "a swallow-like bird",
        "perching-like": "a perching bird",
    },
}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _lookup(table: dict[str, str], value: str, attribute: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"no prompt rule for value {value!r} of {attribute!r}; add it to the script") from None


def make_prompt(attribute: str) -> str:
    """Readable prompt for one CUB attribute, e.g. ``has_under_tail_color::buff`` -> ``a buff-colored under tail``."""
    group, value = parse_attribute(attribute)
    if group in COLOR_NOUNS:
        noun, plural = COLOR_NOUNS[group]
        color = _lookup(COLORS, value, attribute)
        return f"{color} {noun}" if plural else f"{_article(color)} {color} {noun}"
    if group == "has_primary_color":
        return f"a mostly {_lookup(COLORS, value, attribute)} bird"
    if group in PATTERN_NOUNS:
        return f"{_lookup(PATTERNS, value, attribute)} {PATTERN_NOUNS[group]} pattern"
    if group in FIXED:
        return _lookup(FIXED[group], value, attribute)
    raise ValueError(f"no prompt rule for attribute group {group!r} ({attribute!r}); add it to the script")


def read_attributes(path: Path) -> list[tuple[int, str]]:
    """``(attribute_id, name)`` pairs from CUB's ``attributes.txt``, checked to be 1..N in order."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(f"{path}, line {lineno}: expected '<attribute_id> <attribute_name>', got {line!r}")
        rows.append((int(fields[0]), fields[1]))
    ids = [i for i, _ in rows]
    if ids != list(range(1, len(rows) + 1)):
        raise ValueError(f"{path}: attribute ids are not 1..{len(rows)} in order")
    return rows


def build_csv(attributes_txt: Path) -> str:
    """The CSV text for the attributes in ``attributes_txt``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    prompts: dict[str, str] = {}
    for attribute_id, name in read_attributes(attributes_txt):
        group, value = parse_attribute(name)
        if group not in CUB_GROUP_PARTS:
            raise ValueError(f"{attributes_txt}: attribute group {group!r} has no part mapping in traitloc.data.traits")
        prompt = make_prompt(name)
        if prompt in prompts:
            raise ValueError(f"prompt {prompt!r} would be used for both {prompts[prompt]!r} and {name!r}")
        prompts[prompt] = name
        writer.writerow((attribute_id, name, group, value, prompt, ";".join(CUB_GROUP_PARTS[group])))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attributes_txt", type=Path, help="CUB-200-2011 attributes.txt")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help=f"output CSV (default: {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    if not args.attributes_txt.is_file():
        parser.error(f"attributes file not found: {args.attributes_txt}")
    try:
        text = build_csv(args.attributes_txt)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is out of date; rerun without --check", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8", newline="")
    print(f"wrote {text.count(chr(10)) - 1} attributes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
