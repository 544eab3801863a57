"""The commands of the first usage notes run as written on a fresh clone, up to the downloads
this machine cannot make: each stops with one line naming what to fetch or make first, and
exit code 2, never a traceback or an unknown name."""

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO

COMMANDS = {
    "make cache-train": "dataset root",
    "make cache-train CFG=configs/day02_cache.yaml": "dataset root",
    "make final-train-b-keepenv JOINTDIT_MAX_T=6 JOINTDIT_Q_CHUNK_V=2048": "make cache-train",
    "make infer CKPT=checkpoints/stage_b REF=data/cache/avsync15/meta/val/clip.json "
    "PROMPT=dog": "make cache-val",
}


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """The tracked code in a new folder: no data, no cache, no checkpoints (the venv is shared)."""
    root = tmp_path_factory.mktemp("clone")
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("configs", "jointdit", "scripts"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    for name in ("Makefile", "requirements.txt"):
        shutil.copy2(REPO / name, root / name)
    os.symlink(REPO / ".venv", root / ".venv")
    return root


@pytest.mark.parametrize("command", COMMANDS)
def test_first_usage_command_stops_on_what_is_missing(fresh_clone, command):
    make, target, *variables = command.split()
    done = subprocess.run(
        [make, "-s", "-o", ".venv/.installed", "-C", str(fresh_clone), target, *variables],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [x for x in done.stderr.strip().splitlines() if not x.startswith("make")]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert COMMANDS[command] in lines[0]
