import subprocess
import sys

import pytest

from jointdit.config import KNOBS, fingerprint, load_config, load_saved_config, save_resolved
from jointdit.errors import UserError
from tests.conftest import REPO


def write(path, text):
    path.write_text(text)
    return path


def test_precedence_yaml_base_env_cli(tmp_path):
    write(tmp_path / "base.yaml", "infer:\n  steps: 11\n  seed: 3\n")
    cfg_path = write(tmp_path / "job.yaml", "_base_: base.yaml\ninfer:\n  steps: 12\n")
    cfg = load_config(cfg_path)
    assert (cfg.infer.steps, cfg.infer.seed) == (12, 3)  # file beats its base
    cfg = load_config(cfg_path, env={"JOINTDIT_WV": "2.5"})
    assert cfg.infer.wv == 2.5  # env knob beats defaults
    write(tmp_path / "wv.yaml", "infer:\n  wv: 0.25\n")
    cfg = load_config(tmp_path / "wv.yaml", overrides=["infer.wv=4"], env={"JOINTDIT_WV": "2.5"})
    assert cfg.infer.wv == 4.0  # command line beats env beats file


def test_unknown_key_names_key(tmp_path):
    path = write(tmp_path / "bad.yaml", "infer:\n  stepz: 3\n")
    with pytest.raises(UserError, match="infer.stepz"):
        load_config(path)
    with pytest.raises(UserError, match="nosuch.section"):
        load_config(overrides=["nosuch.section=1"])


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", ""])
def test_malformed_knob(value):
    env = {"JOINTDIT_Q_CHUNK_V": value}
    if value == "":  # empty means unset
        assert load_config(env=env).memory.q_chunk_v == 0
        return
    with pytest.raises(UserError, match="JOINTDIT_Q_CHUNK_V.*integer >= 0"):
        load_config(env=env)


def test_wrong_type_in_yaml_and_make_var(tmp_path):
    path = write(tmp_path / "bad.yaml", "memory:\n  q_chunk_v: lots\n")
    with pytest.raises(UserError, match="memory.q_chunk_v"):
        load_config(path)
    with pytest.raises(UserError, match="STEPS"):
        load_config(env={"STEPS": "many"}, make_vars={"STEPS": "infer.steps"})
    assert load_config(env={"STEPS": "9"}, make_vars={"STEPS": "infer.steps"}).infer.steps == 9


def test_yes_no_words_keep_their_key_type(tmp_path):
    # YAML 1.1 reads no / yes / on / off as booleans: `memory.precision=no` used to fail
    cfg = load_config(overrides=["memory.precision=no", "memory.grad_ckpt=yes", "run.name=off"])
    assert (cfg.memory.precision, cfg.memory.grad_ckpt, cfg.run.name) == ("no", True, "off")
    path = write(tmp_path / "words.yaml", "memory:\n  precision: no\n  ema_on_cpu: on\n")
    cfg = load_config(path)
    assert (cfg.memory.precision, cfg.memory.ema_on_cpu) == ("no", True)
    with pytest.raises(UserError, match="memory.grad_ckpt.*boolean.*'maybe'"):
        load_config(overrides=["memory.grad_ckpt=maybe"])


def test_every_knob_points_at_a_real_key():
    cfg = load_config()
    for knob in KNOBS:
        section, key = knob.key.split(".")
        assert key in cfg[section], knob.env


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_save_resolved_and_fingerprint(tmp_path):
    cfg = load_config(overrides=["infer.steps=5"])
    path = save_resolved(cfg, tmp_path / "run")
    again = load_config(path)
    assert again.infer.steps == 5
    assert fingerprint(again) == fingerprint(cfg)
    assert fingerprint(load_config(overrides=["infer.steps=6"])) != fingerprint(cfg)


def test_script_exit_code_two_on_bad_knob(tmp_path):
    code = (
        "from jointdit.cli import run\n"
        "from jointdit.config import load_config\n"
        "run(lambda: load_config() and 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"JOINTDIT_KV_DOWNSAMPLE": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "JOINTDIT_KV_DOWNSAMPLE" in proc.stderr


def test_docs_knob_table_matches_code():
    table = (REPO / "docs" / "configs.md").read_text()
    for knob in KNOBS:
        row = next(
            (line for line in table.splitlines() if line.startswith(f"| `{knob.env}`")), None
        )
        assert row is not None, f"{knob.env} missing from docs/configs.md"
        assert f"`{knob.key}`" in row and knob.meaning in row, row


def test_saved_config_of_an_older_run_keeps_how_it_was_made(tmp_path):
    """A checkpoint saved before the audio expert could read AudioLDM2's own conditioning
    loads with the joint-context audio expert it was trained with."""
    saved = load_config(REPO / "configs" / "stage_a.yaml", env={})
    assert saved.codecs.audio_prompt and saved.model.audio_context == ""
    save_resolved(saved, tmp_path / "new")
    new = load_saved_config(tmp_path / "new" / "config.yaml")
    assert new.model.audio_context == "" and new.codecs.audio_prompt == saved.codecs.audio_prompt
    text = (tmp_path / "new" / "config.yaml").read_text()
    old = "\n".join(
        line
        for line in text.splitlines()
        if not line.strip().startswith(("audio_context", "audio_prompt"))
    )
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(old)
    loaded = load_saved_config(tmp_path / "old" / "config.yaml")
    assert loaded.model.audio_context == "joint" and loaded.codecs.audio_prompt == ""
