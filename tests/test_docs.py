"""Docs that cannot rot: every make target, config file, config key, link and picture that
README.md and docs/ name exists, and the README's demo table is the demo's own output, so a
change that removes, renames or moves one has to change the docs too."""

import json
import re
from pathlib import Path

import pytest

from jointdit.config import schema
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _code(text: str) -> str:
    """What the docs show as code: inline `...` spans and fenced blocks."""
    fenced = re.findall(r"```.*?\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(fenced + inline)


def _targets() -> set[str]:
    makefile = (REPO / "Makefile").read_text()
    rules = re.findall(r"^([a-z][\w -]*):(?!=)", makefile, flags=re.M)
    return {name for rule in rules for name in rule.split()}


def _has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


FILE_TYPES = ("json", "md", "mp4", "png", "py", "safetensors", "txt", "wav", "yaml")


def named(text: str) -> dict[str, set[str]]:
    """What a doc's code names: make targets, config files and config keys."""
    code = _code(text)
    sections = "|".join(schema())
    keys = re.findall(rf"(?<![\w./-])(?:{sections})\.[a-z_]\w*(?:\.[a-z_]\w*)*(?![\w/(])", code)
    return {
        "target": set(re.findall(r"(?<![\w-])make ([a-z][\w-]*)", code)),
        "config file": set(re.findall(r"\bconfigs/[\w/.-]+\.yaml", code)),
        "config key": {k for k in keys if k.rsplit(".", 1)[1] not in FILE_TYPES},
    }


def links(text: str, doc: Path) -> set[Path]:
    """Files that a doc's Markdown links and pictures point to (relative ones, anchors cut)."""
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    return {(doc.parent / t).resolve() for t in targets if "://" not in t}


def missing(text: str, doc: Path) -> list[str]:
    """Everything `text` (the doc at `doc`) names that does not exist, one line each."""
    found = named(text)
    targets, config = _targets(), schema()
    return sorted(
        [f"make {t}" for t in found["target"] - targets]
        + [f for f in found["config file"] if not (REPO / f).is_file()]
        + [f"config key {k}" for k in found["config key"] if not _has_key(config, k)]
        + [f"link {p.relative_to(REPO)}" for p in links(text, doc) if not p.exists()]
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_everything_a_doc_names_exists(doc):
    assert missing(doc.read_text(), doc) == [], f"{doc.name} names what does not exist"


def test_the_check_finds_what_it_looks_for():
    """The patterns match the docs' forms, and a removed target, file, key or picture is
    reported (else the check above would pass vacuously)."""
    readme = (REPO / "README.md").read_text()
    found = named(readme)
    assert {"demo", "test", "infer", "docs-figures"} <= found["target"]
    assert "configs/avsync15.yaml" in found["config file"]
    assert REPO / "docs" / "assets" / "demo_events.png" in links(readme, REPO / "README.md")
    every_key = set().union(*(named(d.read_text())["config key"] for d in DOCS))
    assert {"model.audio_context", "codecs.audio_prompt", "diffusion.cond_aug"} <= every_key

    broken = (
        "Run `make no-such-target` with `configs/no_such.yaml` and `model.no_such_key`,"
        " as [shown](assets/no_such.png); `make demo` is fine."
    )
    assert missing(broken, REPO / "docs" / "x.md") == [
        "config key model.no_such_key",
        "configs/no_such.yaml",
        "link docs/assets/no_such.png",
        "make no-such-target",
    ]


def test_the_readme_shows_the_demos_own_table():
    """README's table is what `make demo` prints (same function, same rounding) for the run
    that `make docs-figures` saved in docs/assets/demo_metrics.json."""
    from jointdit.demo import headline

    table = headline(json.loads((REPO / "docs" / "assets" / "demo_metrics.json").read_text()))
    assert table in (REPO / "README.md").read_text(), (
        "README's demo table differs from docs/assets/demo_metrics.json; paste what "
        "`make docs-figures` prints"
    )


def test_the_readme_leads_with_the_essentials():
    """A reader finds in the first 60 lines what it does, the picture, the two commands, the
    demo's table and where to go next; the README stays under 200 lines."""
    lines = (REPO / "README.md").read_text().splitlines()
    first = "\n".join(lines[:60])
    for needed in ("![", "make demo", "make test", "joint - iso", "## Where to go next"):
        assert needed in first, needed
    assert len(lines) < 200
    assert len((REPO / "docs" / "benchmarks.md").read_text().splitlines()) < 400


WORK_ROUNDS = re.compile(r"\b(issue|session|sprint|round) #?\d+|\b(this|the) session\b", flags=re.I)
SOURCES = REPO / "jointdit" / "assets" / "real_configs" / "SOURCES.md"


@pytest.mark.parametrize("doc", [*DOCS, SOURCES], ids=lambda d: d.name)
def test_docs_speak_of_the_project_not_of_its_work_rounds(doc):
    named_rounds = WORK_ROUNDS.findall(doc.read_text())
    assert not named_rounds, f"{doc.name}: organise by topic, name no work rounds"
    assert WORK_ROUNDS.search("(issue 11: 45.9 GiB)") and WORK_ROUNDS.search("the session's")
    assert not WORK_ROUNDS.search("round trip")


def test_the_first_usage_notes_cache_config_is_the_real_path_one():
    from jointdit.config import load_config, to_dict

    named_cfg = load_config(REPO / "configs" / "day02_cache.yaml", env={})
    assert to_dict(named_cfg) == to_dict(load_config(REPO / "configs" / "avsync15.yaml", env={}))


def test_no_file_holds_merge_conflict_markers():
    files = [REPO / "Makefile", REPO / "requirements.txt", *DOCS]
    for folder in ("configs", "jointdit", "scripts", "tests"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yaml")]
    marked = [
        str(f.relative_to(REPO))
        for f in files
        if re.search(r"^(<{7}|>{7}) ", f.read_text(errors="replace"), flags=re.M)
    ]
    assert marked == []
