"""Test-wide settings: offline, no analytics, small thread count, repo on sys.path."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _knob in [k for k in os.environ if k.startswith("JOINTDIT_")]:
    del os.environ[_knob]  # a user's knobs must not leak into tests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


import pytest  # noqa: E402


def run_script(script: str, *args: str, timeout: float = 300, **env: str):
    """Run scripts/<script> the way `make` does (repo on PYTHONPATH, from the repo root) with
    extra environment variables; returns the CompletedProcess with text stdout / stderr."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Tiny codecs + synthetic clips + cache + a 1-step checkpoint, built once per session."""
    from tests.tiny_world import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))
