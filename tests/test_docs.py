"""Docs that cannot rot: every make target, config file and config key that README.md and
docs/ name exists, so a change that removes or renames one has to change the docs too."""

import re

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


def _named(pattern: str) -> list[tuple[str, str]]:
    """(doc, match) for every match of `pattern` in the code of each doc."""
    return [
        (doc.name, m)
        for doc in DOCS
        for m in sorted(set(re.findall(pattern, _code(doc.read_text()))))
    ]


def _has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("doc,target", _named(r"(?<![\w-])make ([a-z][\w-]*)"))
def test_named_make_targets_exist(doc, target):
    assert target in _targets(), f"{doc} names `make {target}`, which the Makefile lacks"


@pytest.mark.parametrize("doc,path", _named(r"\bconfigs/[\w/.-]+\.yaml"))
def test_named_config_files_exist(doc, path):
    assert (REPO / path).is_file(), f"{doc} names {path}, which does not exist"


def _config_keys() -> list[tuple[str, str]]:
    sections = "|".join(schema())
    return _named(rf"(?<![\w./-])(?:{sections})\.[a-z_][\w]*(?:\.[a-z_][\w]*)*(?![\w/(])")


FILE_TYPES = ("json", "md", "mp4", "png", "py", "safetensors", "txt", "wav", "yaml")


@pytest.mark.parametrize(
    "doc,key", [(d, k) for d, k in _config_keys() if k.rsplit(".", 1)[1] not in FILE_TYPES]
)
def test_named_config_keys_exist(doc, key):
    assert _has_key(schema(), key), f"{doc} names the config key {key}, which does not exist"


def test_the_checks_find_what_they_look_for(tmp_path):
    """The patterns match the docs' forms (else every check above would pass vacuously)."""
    assert {"demo", "test", "infer", "bench-parity"} <= {
        t for _, t in _named(r"(?<![\w-])make ([a-z][\w-]*)")
    }
    assert ("README.md", "configs/infer.yaml") in _named(r"\bconfigs/[\w/.-]+\.yaml")
    keys = {k for _, k in _config_keys()}
    assert {"model.audio_context", "codecs.audio_prompt", "diffusion.cond_aug"} <= keys
    assert not _has_key(schema(), "model.no_such_key")


def test_the_first_usage_notes_cache_config_is_the_real_path_one():
    from jointdit.config import load_config, to_dict

    named = load_config(REPO / "configs" / "day02_cache.yaml", env={})
    assert to_dict(named) == to_dict(load_config(REPO / "configs" / "avsync15.yaml", env={}))
