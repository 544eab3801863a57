"""The Gradio app (`make ui`): a checkpoint, a reference clip or an uploaded image, a prompt and
the JointCFG weights in; the generated video with sound and its preview out.

One request runs at a time (a queue with one worker), so two visitors never share the GPU. A
checkpoint is loaded once and kept until another one is chosen. Every failure reaches the page
as a one-line message; tracebacks stay in the server log.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import secrets
import tempfile
import time
from pathlib import Path

import gradio as gr

from jointdit.checkpoint import list_checkpoints, resolve_checkpoint
from jointdit.config import load_config, repo_path
from jointdit.diffusion import MODES, GuidanceWeights
from jointdit.errors import UserError
from jointdit.pipeline import Generator, Request

log = logging.getLogger(__name__)


def parse_auth(text: str) -> tuple[str, str] | None:
    """`UI_AUTH=user:pass` -> (user, pass); empty -> no login."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        # the value may hold a password: name the variable, never echo it
        raise UserError("UI_AUTH is malformed; accepted: user:password (both non-empty)")
    return user, password


def checkpoint_choices(
    runs_dir: Path, configured: str, fallback: str = ""
) -> tuple[list[tuple[str, str]], str | None]:
    """(label, path) of every complete step_<N>/ of the runs under `runs_dir` (newest step of a
    run first), and the path to preselect: the configured CKPT when it resolves, else the
    `fallback` run's latest step (the demo's final run), else the first listed. Never "the
    newest written": a probe or a test run must not change what the page starts with."""
    found = []
    if runs_dir.is_dir():
        for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
            found += reversed(list_checkpoints(run))
    default = None
    for candidate in (configured, fallback):
        if default is None and candidate:
            try:
                default = resolve_checkpoint(repo_path(candidate))
            except UserError:
                pass  # names a run that is not trained yet: fall back to what exists
    if default is None and found:
        default = found[0]
    if default is not None and default not in found:
        found.insert(0, default)
    choices = [
        (str(p.relative_to(runs_dir)) if p.is_relative_to(runs_dir) else str(p), str(p))
        for p in found
    ]
    return choices, None if default is None else str(default)


def reference_choices(ckpt: str) -> list[tuple[str, str]]:
    """(label, meta JSON path) of the val clips in the cache the checkpoint was trained on."""
    cfg = load_config(Path(ckpt) / "config.yaml")
    meta_dir = repo_path(cfg.cache.dir) / "meta" / "val"
    refs = []
    for path in sorted(meta_dir.glob("*.json")):
        try:
            caption = json.loads(path.read_text()).get("caption", "")
        except (ValueError, AttributeError):
            log.warning("skipping %s: not a cache meta JSON", path)
            continue
        refs.append((f"{path.stem}: {caption}" if caption else path.stem, str(path)))
    return refs


class _LoadedModel:
    """The one Generator in memory; choosing another checkpoint replaces it."""

    def __init__(self, ema: bool):
        self.ema = ema
        self.ckpt: str | None = None
        self.generator: Generator | None = None

    def get(self, ckpt: str) -> Generator:
        if ckpt != self.ckpt:
            self.generator = None  # free the old model before loading the next one
            self.generator = Generator(ckpt, ema=self.ema)
            self.ckpt = ckpt
        return self.generator


def _temp_roots() -> list[str]:
    """Server folders whose paths a visitor must not see (uploads land there)."""
    roots = {tempfile.gettempdir(), os.environ.get("GRADIO_TEMP_DIR", "")}
    return sorted((r.rstrip(os.sep) for r in roots if r), key=len, reverse=True)


def _hide_temp_paths(text: str) -> str:
    """Each path under a server temp folder (`_temp_roots`) in `text` becomes its file name."""
    for root in _temp_roots():
        text = re.sub(re.escape(root) + r"(?:/[^/\s:;,()'\"]+)+", lambda m: Path(m[0]).name, text)
    return text


def _message(e: Exception) -> str:
    """One line for the page (gr.Error renders HTML, so paths like <clip> are escaped)."""
    if isinstance(e, UserError):
        text = str(e)
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        text = f"generation failed: {type(e).__name__}: {first} (details in the server log)"
    return html.escape(" ".join(_hide_temp_paths(text).split()))


def _checked_upload(component: gr.Image) -> gr.Image:
    """Check an image upload before the handler runs: a file that is not a picture (a text file
    named .png) gives a one-line message in the page, not bare "Error" badges. (A wrapped
    method, not a subclass: gradio writes a .pyi stub next to the module of any subclass.)"""
    stock = component.preprocess

    def preprocess(payload):
        try:
            return stock(payload)
        except Exception:
            name = getattr(payload, "orig_name", None) or "the upload"
            log.warning("unreadable upload %s", name, exc_info=True)
            raise gr.Error(
                _message(UserError(f"{name}: not a readable image file (PNG, JPEG, WebP, ...)")),
                print_exception=False,
            ) from None

    component.preprocess = preprocess
    return component


def _demo_run(cfg) -> str:
    """The run `make demo` trains last (its Stage B), the page's default when CKPT is absent."""
    try:
        stage = load_config(repo_path(cfg.demo.stage_b), env={})
    except UserError:
        return ""
    return str(repo_path(stage.train.out_dir) / stage.run.name)


def build_app(cfg) -> gr.Blocks:
    """The page; defaults for every field come from the `infer` section, places from `ui`."""
    inf = cfg.infer
    out_root = repo_path(cfg.ui.out_dir)
    model = _LoadedModel(ema=inf.ema)
    ckpts, ckpt_default = checkpoint_choices(
        repo_path(cfg.ui.runs_dir), inf.ckpt, fallback=_demo_run(cfg)
    )
    refs = reference_choices(ckpt_default) if ckpt_default else []
    ref_default = str(repo_path(inf.ref)) if inf.ref else (refs[0][1] if refs else None)

    def references(ckpt: str):
        try:
            refs = reference_choices(ckpt) if ckpt else []
        except UserError as e:
            raise gr.Error(_message(e)) from None
        return gr.Dropdown(choices=refs, value=refs[0][1] if refs else None)

    def generate(
        ckpt: str | None,
        ref: str | None,
        image: str | None,
        prompt: str,
        neg_prompt: str,
        mode: str,
        iso: bool,
        steps: float,
        seed: float,
        wv: float,
        wa: float,
        wi: float,
        wi_first: float,
        wt: float,
        wnt: float,
        decode_chunk: float,
        progress=gr.Progress(),
    ) -> tuple[str, str]:
        try:
            if not ckpt:
                raise UserError(
                    "no checkpoint to choose: train one (make demo) or start with CKPT=<run folder>"
                )
            if not ref and not image:
                raise UserError("pick a reference clip or upload an image")
            progress(0, desc="loading the checkpoint")
            generator = model.get(ckpt)
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            req = Request(
                out_dir=out_root / stamp,
                ref=ref or "",
                image=image or "",
                prompt=prompt,
                neg_prompt=neg_prompt,
                steps=int(steps),
                seed=int(seed),
                weights=GuidanceWeights(wv=wv, wa=wa, wi=wi, wt=wt, wnt=wnt, wi_first=wi_first),
                mode=mode,
                iso=iso,
                decode_chunk=int(decode_chunk),
            )
            result = generator.generate(
                req, progress=lambda k, n: progress((k, n), desc="sampling", unit="steps")
            )
        except Exception as e:
            if not isinstance(e, UserError):
                log.exception("generation failed")
            raise gr.Error(_message(e), print_exception=False) from None
        return str(result.video_path), str(result.preview_path)

    with gr.Blocks(title="JointDiT", analytics_enabled=False) as app:
        gr.Markdown("## JointDiT: animate and sound an image")
        with gr.Row():
            with gr.Column():
                ckpt = gr.Dropdown(ckpts, value=ckpt_default, label="Checkpoint")
                ref = gr.Dropdown(
                    refs,
                    value=ref_default,
                    label="Reference clip (first frame, caption; the given track in v2a / a2v)",
                )
                image = _checked_upload(
                    gr.Image(
                        type="filepath",
                        sources=["upload"],
                        label="Or upload an image (replaces the reference's first frame)",
                    )
                )
                prompt = gr.Textbox(inf.prompt, label="Prompt (empty: the reference's caption)")
                neg_prompt = gr.Textbox(inf.neg_prompt, label="Negative prompt (used when WNT > 0)")
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=inf.mode, label="Mode")
                    iso = gr.Checkbox(inf.iso, label="iso (joint attention off)")
                with gr.Row():
                    steps = gr.Number(inf.steps, label="Steps", precision=0, minimum=1)
                    seed = gr.Number(inf.seed, label="Seed", precision=0)
                    decode_chunk = gr.Number(
                        inf.decode_chunk,
                        label="Decode chunk (frames; 0: the checkpoint's)",
                        precision=0,
                        minimum=0,
                    )
                with gr.Row():
                    wv = gr.Number(inf.wv, label="WV (joint vs iso, video)")
                    wa = gr.Number(inf.wa, label="WA (joint vs iso, audio)")
                    wi = gr.Number(inf.wi, label="WI (image; video's last frame)")
                    wi_first = gr.Number(inf.wi_first, label="WI_FIRST (image, first frame)")
                    wt = gr.Number(inf.wt, label="WT (text)")
                    wnt = gr.Number(inf.wnt, label="WNT (negative prompt)")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                video = gr.Video(label="Video with sound", interactive=False)
                preview = gr.Image(
                    label="Preview: frames over the mel spectrogram", type="filepath"
                )
        ckpt.change(references, inputs=ckpt, outputs=ref, queue=False, api_name=False)
        button.click(
            generate,
            inputs=[ckpt, ref, image, prompt, neg_prompt, mode, iso, steps, seed]
            + [wv, wa, wi, wi_first, wt, wnt, decode_chunk],
            outputs=[video, preview],
            api_name="generate",
            concurrency_limit=1,
        )
    return app


def launch(cfg, auth: str = "") -> gr.Blocks:
    """Build the app and serve it on `ui.host:ui.port` without blocking; returns the app
    (`app.local_url`; `app.block_thread()` serves until Ctrl-C). `auth` is UI_AUTH's value."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # launch-time telemetry reads the env
    credentials = parse_auth(auth)
    out_root = repo_path(cfg.ui.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    app = build_app(cfg)
    app.queue(default_concurrency_limit=1, max_size=cfg.ui.max_queue)
    try:
        app.launch(
            server_name=cfg.ui.host,
            server_port=cfg.ui.port,
            auth=credentials,
            prevent_thread_lock=True,
            quiet=True,
            ssr_mode=False,
            allowed_paths=[str(out_root)],
        )
    except OSError:  # gradio's own text adds advice about GRADIO_SERVER_PORT: not repeated
        raise UserError(
            f"PORT={cfg.ui.port}: cannot serve on {cfg.ui.host}:{cfg.ui.port} (in use, or not "
            "allowed); choose another with PORT="
        ) from None
    return app
