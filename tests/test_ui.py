"""The Gradio app: a round trip through gradio_client (reference and uploaded image), errors as
one-line messages, one request at a time, the login, and a real headless browser that clicks
Generate and gets a playable video back."""

import html
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from jointdit.config import load_config
from jointdit.errors import UserError
from jointdit.media import read_clip
from jointdit.ui import launch, parse_auth
from tests.conftest import REPO, run_script

FRAMES, FPS, SAMPLE_RATE = 14, 7, 16000  # the embedded default: 2 s at 7 fps, 16 kHz


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(world, out_dir, *extra):
    return load_config(
        REPO / "configs" / "infer.yaml",
        [
            f"infer.ckpt={world.ckpt}",
            f"ui.runs_dir={world.root / 'ckpt'}",
            f"ui.out_dir={out_dir}",
            f"ui.port={_free_port()}",
            "infer.steps=2",
            *extra,
        ],
        env={},
    )


@pytest.fixture(scope="module")
def served(tiny_world, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ui_out")
    app = launch(_config(tiny_world, out_dir))
    yield app, out_dir
    app.close()


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    app, _ = served
    downloads = tmp_path_factory.mktemp("ui_downloads")
    return Client(app.local_url, verbose=False, analytics_enabled=False, download_files=downloads)


def _ask(client, **kw):
    args = dict(
        ckpt=None,  # filled below: the preselected checkpoint
        ref=None,
        image=None,
        prompt="",
        neg_prompt="",
        mode="joint",
        iso=False,
        steps=2,
        seed=3,
        wv=1.5,
        wa=1.5,
        wi=0.5,
        wi_first=0.5,
        wt=0.0,
        wnt=0.0,
        decode_chunk=0,
    )
    args.update(kw)
    return client.predict(**args, api_name="/generate")


def _video_path(value) -> str:
    return value["video"] if isinstance(value, dict) else value  # gr.Video may wrap its file


def _check_clip(path):
    clip = read_clip(path, fps=FPS, size=None, sample_rate=SAMPLE_RATE)
    assert clip.frames.shape[0] == FRAMES
    assert abs(clip.audio.shape[0] / SAMPLE_RATE - FRAMES / FPS) < 1 / FPS
    assert clip.audio.abs().max() > 0  # a soundtrack, not silence


def test_binds_loopback(served):
    app, _ = served
    assert app.local_url.startswith("http://127.0.0.1:")


def test_round_trip_with_reference_and_uploaded_image(client, served, tiny_world, tmp_path):
    _, out_dir = served
    ckpt = str(tiny_world.ckpt)
    video, preview = _ask(client, ckpt=ckpt, ref=str(tiny_world.refs[0]))
    _check_clip(_video_path(video))
    assert Image.open(preview).size[0] >= 64 * 8  # a strip of frames over the spectrogram

    png = tmp_path / "picture.png"
    Image.new("RGB", (80, 64), (200, 40, 40)).save(png)
    video, _ = _ask(client, ckpt=ckpt, image=handle_file(str(png)), prompt="a red square")
    _check_clip(_video_path(video))

    # each request wrote its own folder with the settings it ran with
    metas = [json.loads(p.read_text()) for p in out_dir.glob("*/meta.json")]
    assert len(metas) >= 2
    assert {m["request"]["prompt"] for m in metas} >= {"", "a red square"}


def test_errors_are_one_line_messages(client, tiny_world):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        _ask(client, ckpt=str(tiny_world.ckpt))  # neither a reference nor an image
    assert str(e.value) == "pick a reference clip or upload an image"

    png = tiny_world.root / "ui_error.png"
    Image.new("RGB", (64, 64)).save(png)
    with pytest.raises(AppError) as e:  # v2a needs a given video: the image has none
        _ask(client, ckpt=str(tiny_world.ckpt), image=handle_file(str(png)), mode="v2a")
    message = html.unescape(str(e.value))
    assert message.startswith("MODE=v2a needs VIDEO=<clip>")
    assert "\n" not in message and "Traceback" not in message


def test_bad_upload_is_one_line_in_the_page(client, tiny_world, tmp_path):
    """A text file named .png: one readable line, no server temp path (issue 12)."""
    from gradio_client.exceptions import AppError

    bad = tmp_path / "notes.png"
    bad.write_text("not a picture\n")
    with pytest.raises(AppError) as e:
        _ask(client, ckpt=str(tiny_world.ckpt), image=handle_file(str(bad)))
    message = html.unescape(str(e.value))
    assert message == "notes.png: not a readable image file (PNG, JPEG, WebP, ...)"


def test_messages_hide_server_temp_paths():
    from jointdit.ui import _message

    upload = Path(tempfile.gettempdir()) / "gradio" / "0a1b2c" / "cat.png"
    text = _message(UserError(f"IMAGE={upload}: not a readable image file"))
    assert text == "IMAGE=cat.png: not a readable image file"
    text = _message(OSError(f"[Errno 2] No such file: '{upload}'"))
    assert tempfile.gettempdir() not in text and "cat.png" in text


def _fake_run(root, name, steps):
    for step in steps:
        (root / name / f"step_{step}").mkdir(parents=True)
        (root / name / f"step_{step}" / "state.json").write_text("{}")
        time.sleep(0.01)  # distinct mtimes: the last run written is the newest


def test_checkpoint_list_preselects_the_default_run(tmp_path):
    from jointdit.ui import checkpoint_choices

    _fake_run(tmp_path, "demo_b", [50, 100])
    _fake_run(tmp_path, "a_probe_run", [1])  # written last, sorts first
    choices, default = checkpoint_choices(tmp_path, "", fallback=str(tmp_path / "demo_b"))
    assert default == str(tmp_path / "demo_b" / "step_100")
    assert [label for label, _ in choices] == [
        "a_probe_run/step_1",
        "demo_b/step_100",
        "demo_b/step_50",
    ]
    _, default = checkpoint_choices(tmp_path, str(tmp_path / "demo_b" / "step_50"))
    assert default == str(tmp_path / "demo_b" / "step_50")  # CKPT= wins
    _, default = checkpoint_choices(tmp_path, str(tmp_path / "missing"), fallback="")
    assert default == choices[0][1]  # the list's order, not the newest written


def test_one_request_at_a_time(client, tiny_world, monkeypatch):
    from jointdit.pipeline import Generator

    spans, lock = [], threading.Lock()
    original = Generator.generate

    def timed(self, req, progress=None):
        start = time.perf_counter()
        try:
            return original(self, req, progress)
        finally:
            with lock:
                spans.append((start, time.perf_counter()))

    monkeypatch.setattr(Generator, "generate", timed)
    ref = str(tiny_world.refs[0])
    jobs = [
        client.submit(
            str(tiny_world.ckpt), ref, None, "", "", "joint", False, 2, seed, 0, 0, 0, 0, 0, 0,
            api_name="/generate",
        )
        for seed in (1, 2)
    ]  # fmt: skip
    for job in jobs:
        job.result(timeout=120)
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0  # the second started only after the first finished


def test_auth(tiny_world, tmp_path):
    with pytest.raises(UserError, match="UI_AUTH"):
        parse_auth("no-colon")
    app = launch(_config(tiny_world, tmp_path), auth="ada:s3cret")
    try:
        assert httpx.get(f"{app.local_url}config").status_code in (401, 403)
        authed = Client(
            app.local_url, auth=("ada", "s3cret"), verbose=False, analytics_enabled=False
        )
        assert (
            "/generate"
            in authed.view_api(print_info=False, return_format="dict")["named_endpoints"]
        )
    finally:
        app.close()


def _script(*args, **env):
    return run_script("ui.py", *args, timeout=120, **env)


def test_script_names_bad_variables(tiny_world):
    r = _script("infer.ckpt=" + str(tiny_world.ckpt), PORT="abc")
    assert r.returncode == 2 and "PORT" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _script("infer.ckpt=" + str(tiny_world.ckpt), UI_AUTH="ada:")
    assert r.returncode == 2 and "UI_AUTH" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# a real browser


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium + chromedriver, installed here when absent (root and apt needed)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        try:
            r = subprocess.run(
                ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
                capture_output=True,
                text=True,
                timeout=900,
            )
            failed = r.returncode != 0 and (r.stderr.strip().splitlines() or ["?"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            failed = str(e)
        if failed or not shutil.which("chromedriver"):
            pytest.skip(f"Debian chromium could not be installed: {failed}")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",  # tests may run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",  # the machine has no network: no update checks
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1600",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_browser_click_generate_plays_video(chromium, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, _ = served
    chromium.get(app.local_url)
    wait = WebDriverWait(chromium, 60)
    button = wait.until(
        lambda d: next(
            (b for b in d.find_elements(By.TAG_NAME, "button") if b.text == "Generate"), None
        )
    )
    button.click()  # the page's defaults: the preselected checkpoint and first reference
    src = wait.until(
        lambda d: d.execute_script(
            "const v = document.querySelector('video');"
            "return v && v.readyState >= 1 ? v.currentSrc : null;"
        )
    )
    # the browser decodes and plays it (muted: headless Chromium blocks autoplay with sound)
    played = chromium.execute_async_script(
        "const [v, done] = [document.querySelector('video'), arguments[0]];"
        "v.muted = true;"
        "v.play().then(() => setTimeout(() => done([v.duration, v.currentTime, v.videoWidth]), 700))"
        "  .catch(e => done(String(e)));"
    )
    assert isinstance(played, list), played  # else the play() rejection
    duration, position, width = played
    assert abs(duration - FRAMES / FPS) < 0.2 and position > 0 and width == 64
    clip = tmp_path / "from_page.mp4"
    clip.write_bytes(httpx.get(src).content)
    _check_clip(clip)
