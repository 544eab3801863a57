"""The bad-input matrix (issue 12): every Make variable and script argument a user sets, damaged
files of each kind the repo reads (mp4, png, json, yaml, safetensors), numbers out of range.

Each case runs a script's main() in-process the way `make` does (sys.argv, environment) and
asserts the exit code, exactly one line on stderr naming the value, no traceback, and nothing
changed: every file that existed before has the same bytes and no file was added. A handful of
real subprocess / `make` runs check the same at the front door.

PROMPT and NEG_PROMPT are free text (no value is bad); DIR's contents are read by the metrics.
"""

import hashlib
import importlib.util
import shutil
import socket
import subprocess
import sys

import pytest
from PIL import Image

from jointdit import cli
from tests.conftest import REPO, run_script

# Every variable the Makefile exports, cleared before each case (a user's shell must not leak in).
MAKE_VARS = (
    "CKPT REF PROMPT NEG_PROMPT STEPS SEED WV WA WI WT WNT IMAGE VIDEO AUDIO OUT MODE DIR PORT "
    "UI_AUTH NUM_GPUS GPU_GB LONG FORCE_KEEP_USER_ENVS ACCELERATE_CONFIG RANK WORLD_SIZE"
).split()
_modules: dict[str, object] = {}


def _script(name: str):
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


def _tree(*roots) -> dict[str, tuple]:
    """(size, mtime) of every file and folder under the roots: any write or addition shows."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.exists() else []:
            st = p.stat()
            out[str(p)] = (p.is_file(), st.st_size, st.st_mtime_ns)
    return out


def _hashes(*roots) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _repo_outputs() -> dict[str, tuple]:
    """What a script run with the repo defaults could write: (size, mtime) of those folders."""
    found = {}
    for name in ("outputs", "checkpoints", "data"):
        for p in (REPO / name).rglob("*"):
            st = p.stat()
            found[str(p)] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def bad(tiny_world, tmp_path_factory):
    """Damaged and wrong files of every kind, built once."""
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.png").write_text("not a picture\n")
    png = root / "real.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(png)
    (root / "cut.png").write_bytes(png.read_bytes()[:60])
    (root / "list.json").write_text("[1, 2, 3]\n")
    (root / "garbage.json").write_text("{not json\n")
    (root / "text.mp4").write_text("hello\n")
    clip = next((tiny_world.root / "synth" / "videos").rglob("*.mp4"))
    (root / "cut.mp4").write_bytes(clip.read_bytes()[:400])
    (root / "a_file").write_text("I am a file\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("train: [1,\n")
    (root / "unknown.yaml").write_text("train:\n  bogus: 1\n")
    (root / "wrongtype.yaml").write_text("train:\n  lr: fast\n")
    # a checkpoint whose weights were cut short, and one whose config is not YAML
    cut = root / "ckpt_cut" / "step_1"
    shutil.copytree(tiny_world.ckpt, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    badcfg = root / "ckpt_badcfg" / "step_1"
    shutil.copytree(tiny_world.ckpt, badcfg)
    (badcfg / "config.yaml").write_text("model: [\n")
    # a cache entry whose tensors were cut short
    ref = tiny_world.refs[0]
    meta = root / "cache" / "meta" / "val" / ref.name
    meta.parent.mkdir(parents=True)
    shutil.copy(ref, meta)
    tensors = (ref.parents[2] / "val" / f"{ref.stem}.safetensors").read_bytes()
    (root / "cache" / "val").mkdir()
    (root / "cache" / "val" / f"{ref.stem}.safetensors").write_bytes(tensors[:300])
    # a run whose latest state.json is damaged
    run = root / "runs" / "tiny"
    shutil.copytree(tiny_world.ckpt.parent, run, ignore=shutil.ignore_patterns("previews", "tb"))
    for step in run.glob("step_*"):
        (step / "state.json").write_text("{half")
    return root


@pytest.fixture(scope="module", autouse=True)
def same_bytes(tiny_world, bad):
    """Besides each case's (size, mtime) check: every byte of the world and of the damaged
    files is the same after the whole matrix as before it."""
    before = _hashes(tiny_world.root, bad)
    yield
    assert _hashes(tiny_world.root, bad) == before


def call(monkeypatch, capsys, script: str, *argv: str, **env: str) -> tuple[int, str, str]:
    """scripts/<script> main() through jointdit.cli.run, as `make` runs it; (code, out, err)."""
    for var in MAKE_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    module = _script(script)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(module.main)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def check_one_line(code: int, err: str, want_code: int, *names: str) -> str:
    lines = err.strip().splitlines()
    assert code == want_code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _infer_env(world, tmp_path, **over):
    env = {"CKPT": str(world.ckpt), "REF": str(world.refs[0]), "STEPS": "1"}
    env["OUT"] = str(tmp_path / "out")
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def _p(name):  # a file of the `bad` fixture, resolved when the case runs
    return ("bad", name)


def _world(attr, *more):  # a path of the tiny world
    return ("world", attr, *more)


INFER = [  # (id, Make variables, [ARGS / --config], words the one line must hold)
    ("CKPT missing", {"CKPT": "/nonexistent/run"}, [], ["CKPT=/nonexistent/run"]),
    ("CKPT truncated safetensors", {"CKPT": _p("ckpt_cut")}, [], ["model.safetensors"]),
    ("CKPT config not YAML", {"CKPT": _p("ckpt_badcfg")}, [], ["config.yaml", "YAML"]),
    ("REF missing", {"REF": "/nonexistent.json"}, [], ["REF=/nonexistent.json"]),
    ("REF not JSON", {"REF": _p("garbage.json")}, [], ["REF=", "not a JSON"]),
    ("REF a JSON list", {"REF": _p("list.json")}, [], ["REF=", "not a cache meta JSON"]),
    ("REF truncated tensors", {"REF": _p("cache/meta/val")}, [], ["REF=", "safetensors"]),
    ("IMAGE text named png", {"REF": "", "IMAGE": _p("notes.png")}, [], ["IMAGE="]),
    ("IMAGE truncated png", {"REF": "", "IMAGE": _p("cut.png")}, [], ["IMAGE="]),
    ("IMAGE missing", {"REF": "", "IMAGE": "/nonexistent.png"}, [], ["IMAGE="]),
    ("no REF nor IMAGE", {"REF": ""}, [], ["REF=", "IMAGE="]),
    ("STEPS word", {"STEPS": "many"}, [], ["STEPS"]),
    ("STEPS zero", {"STEPS": "0"}, [], ["STEPS", ">= 1"]),
    ("STEPS negative", {"STEPS": "-3"}, [], ["STEPS"]),
    ("STEPS fraction", {"STEPS": "1.5"}, [], ["STEPS"]),
    ("SEED word", {"SEED": "abc"}, [], ["SEED"]),
    ("SEED negative", {"SEED": "-1"}, [], ["SEED", ">= 0"]),
    ("WV word", {"WV": "x"}, [], ["WV"]),
    ("WA nan", {"WA": "nan"}, [], ["WA", "finite"]),
    ("WV exponent", {"WV": "-1e400"}, [], ["WV", "finite"]),
    ("WI inf", {"WI": ".inf"}, [], ["WI", "finite"]),
    ("WT word", {"WT": "strong"}, [], ["WT"]),
    ("WNT nan", {"WNT": ".nan"}, [], ["WNT", "finite"]),
    ("MODE unknown", {"MODE": "up"}, [], ["MODE", "joint"]),
    ("VIDEO missing", {"MODE": "v2a", "VIDEO": "/nonexistent.mp4"}, [], ["VIDEO="]),
    ("VIDEO text named mp4", {"MODE": "v2a", "VIDEO": _p("text.mp4")}, [], ["VIDEO=", "readable"]),
    ("VIDEO truncated mp4", {"MODE": "v2a", "VIDEO": _p("cut.mp4")}, [], ["VIDEO=", "readable"]),
    ("AUDIO missing", {"MODE": "a2v", "AUDIO": "/nonexistent.wav"}, [], ["AUDIO="]),
    ("AUDIO not media", {"MODE": "a2v", "AUDIO": _p("notes.png")}, [], ["AUDIO=", "no audio"]),
    ("AUDIO text named wav", {"MODE": "a2v", "AUDIO": _p("text.mp4")}, [], ["AUDIO=", "readable"]),
    ("OUT an existing file", {"OUT": _p("a_file")}, [], ["OUT=", "is a file"]),
    ("OUT below a file", {"OUT": _p("a_file/sub")}, [], ["OUT=", "is a file"]),
    ("OUT the checkpoint", {"OUT": _world("ckpt")}, [], ["OUT=", "checkpoint folder"]),
    ("OUT in the checkpoint", {"OUT": _world("ckpt", "x")}, [], ["OUT=", "checkpoint folder"]),
    ("OUT the run folder", {"OUT": _world("run")}, [], ["OUT=", "checkpoint folder"]),
    ("CFG missing", {}, ["--config", "/nonexistent.yaml"], ["/nonexistent.yaml"]),
    ("CFG not YAML", {}, ["--config", _p("broken.yaml")], ["broken.yaml", "YAML"]),
    ("CFG a list", {}, ["--config", _p("list.yaml")], ["list.yaml", "mapping"]),
    ("CFG unknown key", {}, ["--config", _p("unknown.yaml")], ["train.bogus"]),
    ("CFG wrong type", {}, ["--config", _p("wrongtype.yaml")], ["train.lr", "number"]),
    ("ARGS out of range", {}, ["infer.steps=0"], ["infer.steps", ">= 1"]),
    ("ARGS unknown key", {}, ["infer.bogus=1"], ["infer.bogus"]),
    ("ARGS not key=value", {}, ["steps"], ["steps", "key=value"]),
    ("ARGS unknown flag", {}, ["--fast"], ["--fast"]),
    ("knob negative", {"JOINTDIT_MAX_T": "-1"}, [], ["JOINTDIT_MAX_T"]),
    ("knob choice", {"JOINTDIT_PRECISION": "fp8"}, [], ["JOINTDIT_PRECISION", "bf16"]),
    ("knob nan", {"JOINTDIT_WV": "nan"}, [], ["JOINTDIT_WV", "finite"]),
]


def _resolve(value, bad, world):
    if isinstance(value, tuple) and value[0] == "bad":
        path = bad / value[1]
        return str(
            next(path.glob("*.json")) if path.is_dir() and value[1].endswith("val") else path
        )
    if isinstance(value, tuple) and value[0] == "world":
        base = world.ckpt.parent if value[1] == "run" else world.ckpt
        return str(base.joinpath(*value[2:]))
    return value


@pytest.mark.parametrize("case, env, argv, words", INFER, ids=[c[0] for c in INFER])
def test_make_infer(case, env, argv, words, tiny_world, bad, tmp_path, monkeypatch, capsys):
    env = _infer_env(
        tiny_world, tmp_path, **{k: _resolve(v, bad, tiny_world) for k, v in env.items()}
    )
    argv = [_resolve(a, bad, tiny_world) for a in argv]
    if argv[:1] != ["--config"]:
        argv = ["--config", str(REPO / "configs" / "infer.yaml"), *argv]
    before = _tree(tiny_world.root, bad, tmp_path), _repo_outputs()
    code, _, err = call(monkeypatch, capsys, "infer.py", *argv, **env)
    check_one_line(code, err, 2, *words)
    assert (_tree(tiny_world.root, bad, tmp_path), _repo_outputs()) == before


def _train_args(world, *extra):
    return ["--config", str(REPO / "configs" / "demo" / "stage_a.yaml"), *world.overrides, *extra]


TRAIN = [
    ("batch_size zero", ["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    ("batch_size above the clips", ["run.name=fresh", "train.batch_size=64"], ["batch_size=64"]),
    ("lr nan", ["train.lr=.nan"], ["train.lr", "finite"]),
    ("lr negative", ["train.lr=-1e-4"], ["train.lr", "> 0"]),
    ("max_steps zero", ["train.max_steps=0"], ["train.max_steps"]),
    ("betas one number", ["train.betas=[0.9]"], ["train.betas"]),
    ("ema_decay above one", ["train.ema_decay=1.5"], ["train.ema_decay"]),
    ("p_iso above one", ["diffusion.p_iso=2"], ["diffusion.p_iso"]),
    ("precision unknown", ["memory.precision=fp8"], ["memory.precision"]),
    ("no cache", ["cache.dir=/nonexistent/cache"], ["/nonexistent/cache"]),
    ("init_from missing", ["run.name=fresh", "train.init_from=/nonexistent/run"], ["/nonexistent"]),
    ("unfreeze unknown", ["train.unfreeze=[nope.]"], ["train.unfreeze", "nope."]),
    ("resume damaged state", [f"train.out_dir={'{bad}'}/runs"], ["state.json"]),
    ("flag typo", ["--forse-resume"], ["--forse-resume"]),
]


@pytest.mark.parametrize("case, extra, words", TRAIN, ids=[c[0] for c in TRAIN])
def test_make_train(case, extra, words, tiny_world, bad, monkeypatch, capsys):
    extra = [e.replace("{bad}", str(bad)) for e in extra]
    before = _tree(tiny_world.root, bad), _repo_outputs()
    code, _, err = call(monkeypatch, capsys, "train.py", *_train_args(tiny_world, *extra))
    check_one_line(code, err, 2, *words)
    assert (_tree(tiny_world.root, bad), _repo_outputs()) == before  # no run folder either


OTHER = [  # (id, script, argv, env, words)
    ("cache split", "cache_latents.py", ["--split", "bogus"], {}, ["--split", "bogus"]),
    ("cache RANK", "cache_latents.py", ["--split", "train"], {"RANK": "x"}, ["RANK='x'"]),
    ("cache WORLD_SIZE", "cache_latents.py", ["--split", "train"], {"WORLD_SIZE": "0"}, ["WORLD_SIZE"]),
    ("cache fail frac", "cache_latents.py", ["--split", "train", "cache.max_fail_frac=2"], {}, ["cache.max_fail_frac"]),
    ("cache no_audio", "cache_latents.py", ["--split", "train", "cache.no_audio=maybe"], {}, ["cache.no_audio", "silence"]),
    ("cache root", "cache_latents.py", ["--split", "train", "data.root=/nonexistent/set"], {}, ["/nonexistent/set"]),
    ("synth count", "make_synth.py", ["data.synth.num_train=-1"], {}, ["data.synth.num_train"]),
    ("synth fps", "make_synth.py", ["data.fps=-7"], {}, ["data.fps"]),
    ("tiny lr", "train_tiny_codecs.py", ["codecs.tiny.lr=0"], {}, ["codecs.tiny.lr"]),
    ("fetch source", "fetch_models.py", ["--only", "bogus"], {}, ["bogus"]),
    ("demo LONG", "demo.py", [], {"LONG": "2"}, ["LONG='2'"]),
    ("demo CFG", "demo.py", ["--config", "/nonexistent.yaml"], {}, ["/nonexistent.yaml"]),
    ("demo ARGS", "demo.py", ["demo.num_samples=0"], {}, ["demo.num_samples"]),
    ("eval DIR unset", "eval.py", [], {}, ["DIR"]),
    ("eval DIR missing", "eval.py", [], {"DIR": "/nonexistent/dir"}, ["DIR=/nonexistent/dir"]),
    ("eval CFG", "eval.py", ["--config", "/nonexistent.yaml"], {"DIR": "/tmp"}, ["/nonexistent.yaml"]),
    ("eval bootstrap", "eval.py", ["eval.bootstrap=0"], {"DIR": "/tmp"}, ["eval.bootstrap"]),
    ("probe CKPT unset", "probe.py", [], {}, ["CKPT"]),
    ("probe CKPT missing", "probe.py", [], {"CKPT": "/nonexistent/run"}, ["CKPT=/nonexistent/run"]),
    ("probe CFG", "probe.py", ["--config", "x.yaml"], {"CKPT": "/x"}, ["CFG=x.yaml"]),
    ("probe levels", "probe.py", ["--levels", "0.5,2"], {"CKPT": "/x"}, ["--levels"]),
    ("probe repeats", "probe.py", ["--repeats", "0"], {"CKPT": "/x"}, ["--repeats"]),
    ("probe int", "probe.py", ["--max-clips", "some"], {"CKPT": "/x"}, ["--max-clips"]),
    ("bench CFG", "bench_attn.py", ["--config", "x.yaml"], {}, ["CFG=x.yaml"]),
    ("bench grids", "bench_attn.py", ["--grids", "8,x"], {}, ["--grids"]),
    ("bench dim", "bench_attn.py", ["--dim", "100", "--heads", "8"], {}, ["--dim 100"]),
    ("bench frames", "bench_attn.py", ["--frames", "0"], {}, ["--frames"]),
    ("bench dtype", "bench_attn.py", ["--dtype", "float8"], {}, ["--dtype"]),
    ("plan GPU_GB", "plan_memory.py", [], {"GPU_GB": "lots"}, ["GPU_GB='lots'"]),
    ("final NUM_GPUS", "final_train.py", [], {"NUM_GPUS": "two"}, ["NUM_GPUS='two'"]),
    ("final GPU_GB", "final_train.py", [], {"GPU_GB": "0"}, ["GPU_GB"]),
    ("final keepenv", "final_train.py", [], {"FORCE_KEEP_USER_ENVS": "2"}, ["FORCE_KEEP_USER_ENVS"]),
    ("final accelerate", "final_train.py", [], {"ACCELERATE_CONFIG": "/nonexistent.yaml"}, ["ACCELERATE_CONFIG"]),
    ("final ARGS", "final_train.py", ["train.lr=.nan"], {}, ["train.lr"]),
    ("ui PORT word", "ui.py", [], {"PORT": "abc"}, ["PORT"]),
    ("ui PORT range", "ui.py", [], {"PORT": "70000"}, ["PORT", "65535"]),
    ("ui UI_AUTH", "ui.py", [], {"UI_AUTH": "ada:"}, ["UI_AUTH"]),
    ("ui CKPT missing", "ui.py", [], {"CKPT": "/nonexistent/run"}, ["CKPT=/nonexistent/run"]),
    ("ui max_queue", "ui.py", ["ui.max_queue=0"], {}, ["ui.max_queue"]),
]  # fmt: skip


@pytest.mark.parametrize("case, script, argv, env, words", OTHER, ids=[c[0] for c in OTHER])
def test_other_targets(case, script, argv, env, words, tiny_world, bad, monkeypatch, capsys):
    before = _tree(tiny_world.root, bad), _repo_outputs()
    code, _, err = call(monkeypatch, capsys, script, *argv, **env)
    check_one_line(code, err, 2, *words)
    assert (_tree(tiny_world.root, bad), _repo_outputs()) == before


def test_cache_settings_changed(tiny_world, monkeypatch, capsys):
    """Re-caching into a cache made with other settings stops before its config is rewritten."""
    args = ["--config", str(REPO / "configs" / "demo" / "base.yaml"), "--split", "val"]
    before = _tree(tiny_world.root)
    code, _, err = call(monkeypatch, capsys, "cache_latents.py", *args, *tiny_world.overrides, "cache.window=start")  # fmt: skip
    check_one_line(code, err, 2, "--overwrite", "cache.dir")
    assert _tree(tiny_world.root) == before


def test_ui_port_in_use(tiny_world, tmp_path, monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = [f"infer.ckpt={tiny_world.ckpt}", f"ui.out_dir={tmp_path}"]
        args += [f"ui.runs_dir={tiny_world.ckpt.parent.parent}"]
        code, _, err = call(monkeypatch, capsys, "ui.py", *args, PORT=port)
    line = check_one_line(code, err, 2, f"PORT={port}", "choose another")
    assert "GRADIO_SERVER_PORT" not in line and "server_port" not in line


# ---------------------------------------------------------------------------------------------
# the front door: real processes


def test_make_front_door(tiny_world, tmp_path):
    """`make` itself: a bad variable is one line from the script (plus make's own status line),
    `make eval CFG=` is honoured, and `make help` lists every target."""
    make = ["make", "-s", "-o", ".venv/.installed", "-C", str(REPO)]
    r = subprocess.run([*make, "infer", "STEPS=0", f"OUT={tmp_path}/o"], capture_output=True, text=True, timeout=300)  # fmt: skip
    script_lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("make")]
    assert r.returncode != 0 and len(script_lines) == 1 and "STEPS" in script_lines[0], r.stderr
    assert not (tmp_path / "o").exists()
    r = subprocess.run([*make, "eval", "CFG=/nonexistent.yaml", "DIR=/tmp"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and "/nonexistent.yaml" in r.stderr, r.stderr
    r = subprocess.run([*make, "help"], capture_output=True, text=True, timeout=60)
    phony = (REPO / "Makefile").read_text().split(".PHONY:")[1].split("\n\n")[0]
    targets = {t for t in phony.replace("\\", " ").split() if t != "bench-attn"}
    listed = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("make ")}
    assert targets - {"help"} <= listed, targets - listed


def test_final_train_failure_is_one_line(tmp_path):
    """The child's one-line error, without accelerate's CalledProcessError traceback after it."""
    r = run_script(
        "final_train.py",
        "--config",
        str(REPO / "configs" / "demo" / "stage_a.yaml"),
        f"cache.dir={tmp_path / 'no_cache'}",
        f"train.out_dir={tmp_path / 'ckpt'}",
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "no cached clips" in lines[0], r.stderr
    assert not (tmp_path / "ckpt").exists()
