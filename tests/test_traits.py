"""Tests for traitloc.data.traits, the built-in CUB trait list and scripts/make_cub_trait_list.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from traitloc.data import traits
from traitloc.data.traits import (
    CUB_GROUP_PARTS,
    CUB_PARTS,
    Trait,
    attribute_parts,
    available_trait_lists,
    load_trait_list,
    parse_attribute,
)

REPO = Path(__file__).resolve().parents[1]
CSV_PATH = REPO / "trait_lists" / "cub200_attributes.csv"
CUB_ROOT = Path(os.environ.get("TRAITLOC_CUB_ROOT", Path(__file__).resolve().parents[2] / "shared" / "cub"))


def _attributes_txt(root: Path) -> Path | None:
    for path in (root / "attributes.txt", root / "CUB_200_2011" / "attributes.txt"):
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_cub_trait_list", REPO / "scripts" / "make_cub_trait_list.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def cub200() -> list[Trait]:
    return load_trait_list("cub200")


# ---------------------------------------------------------------- built-in CUB list
def test_cub200_is_available_and_complete(cub200):
    assert "cub200" in available_trait_lists() and "cub200_attributes" not in available_trait_lists()
    assert load_trait_list("cub200_attributes") == cub200 == load_trait_list(CSV_PATH)
    assert len(cub200) == 312
    assert [t.attribute_id for t in cub200] == list(range(1, 313))
    assert len({t.name for t in cub200}) == 312
    assert len({t.prompt.lower() for t in cub200}) == 312
    assert {t.group for t in cub200} == set(CUB_GROUP_PARTS)


def test_cub200_rows_agree_with_the_part_mapping(cub200):
    for t in cub200:
        group, _ = parse_attribute(t.name)
        assert t.group == group
        assert t.parts == attribute_parts(t.name)
        assert set(t.parts) <= set(CUB_PARTS)


def test_cub200_prompts_are_readable(cub200):
    for t in cub200:
        assert t.prompt == t.prompt.strip()
        assert "_" not in t.prompt and "::" not in t.prompt and "  " not in t.prompt, t.prompt
        assert "undertail" not in t.prompt and "uppertail" not in t.prompt
        assert not re.search(r"\ba [aeio]", t.prompt), t.prompt  # "a uniquely ..." is right
        assert not re.search(r"\ban [^aeiou]", t.prompt), t.prompt
        _, value = parse_attribute(t.name)
        if t.group.endswith("_color"):
            assert value in t.prompt, (t.name, t.prompt)
            if value == "buff":
                assert "buff-colored" in t.prompt


def test_cub200_tail_wording(cub200):
    by_group: dict[str, list[Trait]] = {}
    for t in cub200:
        by_group.setdefault(t.group, []).append(t)
    assert len(by_group["has_upper_tail_color"]) == len(by_group["has_under_tail_color"]) == 15
    for t in by_group["has_upper_tail_color"]:
        assert t.prompt.endswith(" upper tail") and "under" not in t.prompt
    for t in by_group["has_under_tail_color"]:
        assert t.prompt.endswith(" under tail") and "upper" not in t.prompt


def test_cub200_specific_prompts(cub200):
    prompts = {t.name: t.prompt for t in cub200}
    assert prompts["has_bill_length::about_the_same_as_head"] == "a bill about the same length as the head"
    assert prompts["has_size::small_(5_-_9_in)"] == "a small bird (5 - 9 inches)"
    assert prompts["has_wing_color::blue"] == "blue wings"
    assert prompts["has_bill_shape::hooked"] == "a hooked bill"
    assert prompts["has_head_pattern::crested"] == "a crested head"
    assert prompts["has_breast_pattern::striped"] == "striped breast pattern"
    assert prompts["has_primary_color::iridescent"] == "a mostly iridescent bird"
    assert prompts["has_back_color::iridescent"] == "an iridescent back"


# ---------------------------------------------------------------- attribute_parts
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("has_wing_color::blue", ("left wing", "right wing")),
        ("has_wing_shape", ("left wing", "right wing")),
        ("has_crown_color::red", ("crown",)),
        ("has_bill_shape::hooked", ("beak",)),
        ("has_bill_length::longer_than_head", ("beak",)),
        ("has_eye_color::red", ("left eye", "right eye")),
        ("has_leg_color::pink", ("left leg", "right leg")),
        ("has_upper_tail_color::white", ("tail",)),
        ("has_under_tail_color::white", ("tail",)),
        ("has_underparts_color::white", ("belly", "breast", "throat")),
        ("has_upperparts_color::white", ("back", "crown", "nape")),
        ("has_size::small_(5_-_9_in)", ()),
        ("has_shape::duck-like", ()),
        ("has_primary_color::black", ()),
    ],
)
def test_attribute_parts(name, expected):
    assert attribute_parts(name) == expected


def test_attribute_parts_follow_official_order():
    for group, parts in CUB_GROUP_PARTS.items():
        assert list(parts) == sorted(parts, key=CUB_PARTS.index), group


def test_attribute_parts_errors():
    with pytest.raises(ValueError, match="unknown CUB attribute group 'has_tail_colour'"):
        attribute_parts("has_tail_colour::blue")
    with pytest.raises(ValueError, match="not a CUB attribute name"):
        attribute_parts("wing_color::")
    with pytest.raises(TypeError, match="attribute_name must be a str"):
        attribute_parts(3)


# ---------------------------------------------------------------- Trait
def test_trait_is_frozen_and_validated():
    t = Trait("x", "blue wings", ("left wing",), 3, "has_wing_color")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.prompt = "red wings"
    with pytest.raises(ValueError, match="prompt"):
        Trait("x", "  ")
    with pytest.raises(TypeError, match="parts"):
        Trait("x", "y", ["left wing"])
    with pytest.raises(ValueError, match="attribute_id"):
        Trait("x", "y", (), 0)


# ---------------------------------------------------------------- user files
def test_txt_list_skips_comments_and_blanks(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# my traits\n\nred epaulets\n  white wing bars  \n#another\n", encoding="utf-8")
    loaded = load_trait_list(path)
    assert [t.prompt for t in loaded] == ["red epaulets", "white wing bars"]
    assert loaded[0] == Trait(name="red epaulets", prompt="red epaulets")
    assert load_trait_list(str(path)) == loaded


def test_txt_duplicates_warn_and_dedupe(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("red cap\nblue wings\nRed  Cap\nred cap\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 2 duplicate prompt"):
        loaded = load_trait_list(path)
    assert [t.prompt for t in loaded] == ["red cap", "blue wings"]


def test_csv_list_with_optional_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "Name,prompt,parts,attribute_id,group\n"
        "epaulet,red epaulets, left wing ; right wing ;,7,shoulder\n"
        ",,,,\n"
        "bars,white wing bars,,,\n",
        encoding="utf-8",
    )
    loaded = load_trait_list(path)
    assert loaded == [
        Trait("epaulet", "red epaulets", ("left wing", "right wing"), 7, "shoulder"),
        Trait("bars", "white wing bars"),
    ]


def test_csv_attribute_column_names_traits_and_prompt_only_works(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("attribute,prompt\nhas_x::y,a y x\n", encoding="utf-8")
    assert load_trait_list(path)[0].name == "has_x::y"
    path.write_text("prompt\na y x\n", encoding="utf-8")
    assert load_trait_list(path) == [Trait("a y x", "a y x")]


def test_csv_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("name,text\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        load_trait_list(path)
    path.write_text("name,prompt\n", encoding="utf-8")
    with pytest.raises(ValueError, match="trait list is empty"):
        load_trait_list(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_trait_list(path)
    path.write_text("name,prompt\na,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: empty prompt"):
        load_trait_list(path)
    path.write_text("prompt,attribute_id\na,seven\n", encoding="utf-8")
    with pytest.raises(ValueError, match="attribute_id must be an integer"):
        load_trait_list(path)
    path.write_text("name,prompt\na,red cap\na,blue cap\n", encoding="utf-8")
    with pytest.raises(ValueError, match="trait name 'a' is used for two prompts"):
        load_trait_list(path)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown trait list 'cub201'.*built-in lists: .*cub200"):
        load_trait_list("cub201")
    with pytest.raises(FileNotFoundError, match="trait list file not found"):
        load_trait_list(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="trait list file not found"):
        load_trait_list(str(tmp_path / "nope.txt"))
    (tmp_path / "t.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported trait list format '.json'"):
        load_trait_list(tmp_path / "t.json")
    (tmp_path / "only_comments.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="trait list is empty"):
        load_trait_list(tmp_path / "only_comments.txt")
    with pytest.raises(ValueError, match="must not be empty"):
        load_trait_list(" ")
    with pytest.raises(TypeError, match="name_or_path"):
        load_trait_list(12)


def test_builtins_fall_back_to_package_data(tmp_path, monkeypatch):
    (tmp_path / "birds_extra.txt").write_text("red epaulets\n", encoding="utf-8")
    monkeypatch.setattr(traits, "_repo_trait_dir", lambda: None)
    monkeypatch.setattr(traits, "_package_trait_dir", lambda: tmp_path)
    assert available_trait_lists() == ["birds_extra"]
    assert load_trait_list("birds_extra") == [Trait("red epaulets", "red epaulets")]
    with pytest.raises(ValueError, match="built-in lists: birds_extra"):
        load_trait_list("cub200")
    monkeypatch.setattr(traits, "_package_trait_dir", lambda: None)
    assert available_trait_lists() == []


# ---------------------------------------------------------------- generator script
def test_script_generates_deterministic_csv(tmp_path, script):
    attrs = tmp_path / "attributes.txt"
    attrs.write_text(
        "1 has_under_tail_color::buff\n2 has_upper_tail_color::iridescent\n3 has_size::very_large_(32_-_72_in)\n"
        "4 has_bill_length::shorter_than_head\n5 has_wing_pattern::multi-colored\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.csv"
    assert script.main([str(attrs), "-o", str(out)]) == 0
    first = out.read_bytes()
    assert script.main([str(attrs), "-o", str(out), "--check"]) == 0
    loaded = load_trait_list(out)
    assert [t.prompt for t in loaded] == [
        "a buff-colored under tail",
        "an iridescent upper tail",
        "a very large bird (32 - 72 inches)",
        "a bill shorter than the head",
        "multi-colored wing pattern",
    ]
    assert [t.parts for t in loaded] == [("tail",), ("tail",), (), ("beak",), ("left wing", "right wing")]
    assert script.main([str(attrs), "-o", str(out)]) == 0
    assert out.read_bytes() == first
    out.write_text(first.decode().replace("buff-colored", "buff"), encoding="utf-8")
    assert script.main([str(attrs), "-o", str(out), "--check"]) == 1


def test_script_rejects_unknown_values(tmp_path, script, capsys):
    attrs = tmp_path / "attributes.txt"
    attrs.write_text("1 has_wing_color::magenta\n", encoding="utf-8")
    assert script.main([str(attrs), "-o", str(tmp_path / "o.csv")]) == 2
    assert "magenta" in capsys.readouterr().err
    attrs.write_text("1 has_wing_color::blue\n3 has_wing_color::red\n", encoding="utf-8")
    assert script.main([str(attrs), "-o", str(tmp_path / "o.csv")]) == 2
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.cub
def test_committed_csv_matches_real_attributes(tmp_path, script):
    attrs = _attributes_txt(CUB_ROOT)
    if attrs is None:
        pytest.skip(f"CUB attributes.txt not found under {CUB_ROOT}")
    assert script.build_csv(attrs) == CSV_PATH.read_text(encoding="utf-8")
    real = [line.split()[1] for line in attrs.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [t.name for t in load_trait_list("cub200")] == real
