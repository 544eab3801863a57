"""Configs: YAML (with `_base_:` inheritance), then JOINTDIT_* env knobs, then key=value overrides.

The schema is the union of `jointdit/defaults/<section>.yaml`: every key a config may set
exists there with its default, and its default's type is the accepted type; `LIMITS` below adds
the accepted range or choices of a key, and every number must be finite. Unknown keys, values
of the wrong type and values out of range stop with one line naming the key (a UserError, exit
code 2), before any work starts.

Precedence, lowest to highest:
    defaults  <  YAML file (bases first)  <  JOINTDIT_* environment knobs  <  command line
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from jointdit.errors import UserError

DEFAULTS_DIR = Path(__file__).parent / "defaults"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Knob:
    """An environment variable that overrides one config key."""

    env: str
    key: str
    parse: Callable[[str], Any]
    accepted: str
    meaning: str


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)  # ValueError on 'abc' or '1.5'
        if value < low:
            raise ValueError(text)
        return value

    return parse


class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true / false. PyYAML's YAML 1.1 also reads yes / no / on / off
    as booleans, which turned `memory.precision=no` (a string key) into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _bool(text: str) -> bool:
    table = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    return table[text.strip().lower()]  # KeyError -> reported as malformed


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(text)
        return text

    return parse


# The one table of environment knobs (DESIGN sections 4 and 5). docs/configs.md mirrors it.
KNOBS: tuple[Knob, ...] = (
    Knob(
        "JOINTDIT_MAX_T",
        "memory.max_t",
        _int_at_least(0),
        "integer >= 0",
        "cap on video frames per clip (0 = no cap); lossy",
    ),
    Knob(
        "JOINTDIT_Q_CHUNK_V",
        "memory.q_chunk_v",
        _int_at_least(0),
        "integer >= 0",
        "video query chunk size in joint attention (0 = off); exact",
    ),
    Knob(
        "JOINTDIT_Q_CHUNK_A",
        "memory.q_chunk_a",
        _int_at_least(0),
        "integer >= 0",
        "audio query chunk size in joint attention (0 = off); exact",
    ),
    Knob(
        "JOINTDIT_KV_DOWNSAMPLE",
        "memory.kv_downsample",
        _int_at_least(1),
        "integer >= 1",
        "pool video keys/values spatially by this factor per frame (1 = off); lossy",
    ),
    Knob(
        "JOINTDIT_GRAD_CKPT",
        "memory.grad_ckpt",
        _bool,
        "0/1/true/false/yes/no",
        "gradient checkpointing of the joint blocks and experts; exact",
    ),
    Knob(
        "JOINTDIT_PRECISION",
        "memory.precision",
        _choice("no", "bf16", "fp16"),
        "no | bf16 | fp16",
        "mixed precision for training and sampling (GPU)",
    ),
    Knob(
        "JOINTDIT_EMA_CPU",
        "memory.ema_on_cpu",
        _bool,
        "0/1/true/false/yes/no",
        "keep the EMA of the trainable parameters in host memory; exact",
    ),
    Knob(
        "JOINTDIT_OPTIM_CPU",
        "memory.optim_on_cpu",
        _bool,
        "0/1/true/false/yes/no",
        "AdamW state and update in host memory (gradients to host, weights back); exact",
    ),
    Knob(
        "JOINTDIT_FROZEN_LOWP",
        "memory.frozen_lowp",
        _bool,
        "0/1/true/false/yes/no",
        "frozen Linear/Conv weights stored in the compute dtype (bf16/fp16); exact under autocast",
    ),
    Knob(
        "JOINTDIT_FUSED_STEP",
        "memory.fused_step",
        _bool,
        "0/1/true/false/yes/no",
        "optimizer step per parameter during backward, gradients freed at once; exact "
        "(needs grad_accum 1, max_grad_norm 0)",
    ),
    Knob(
        "JOINTDIT_OPTIM_8BIT",
        "memory.optim_8bit",
        _bool,
        "0/1/true/false/yes/no",
        "AdamW states stored block-wise in 8 bits; APPROXIMATION",
    ),
    Knob(
        "JOINTDIT_VID_DECODE_CHUNK",
        "codecs.video_decode_chunk",
        _int_at_least(0),
        "integer >= 0",
        "frames per chunk when decoding video latents (0 = the whole clip, as SVD); bounds "
        "decode memory",
    ),
    Knob("JOINTDIT_WV", "infer.wv", float, "number", "guidance weight: joint vs iso, video"),
    Knob("JOINTDIT_WA", "infer.wa", float, "number", "guidance weight: joint vs iso, audio"),
    Knob(
        "JOINTDIT_WI",
        "infer.wi",
        float,
        "number",
        "guidance weight: image condition (audio, and the video's last frame)",
    ),
    Knob(
        "JOINTDIT_WI_FIRST",
        "infer.wi_first",
        float,
        "number",
        "guidance weight: image condition on the video's first frame (a linear ramp to WI)",
    ),
    Knob("JOINTDIT_WT", "infer.wt", float, "number", "guidance weight: text condition"),
    Knob(
        "JOINTDIT_WNT", "infer.wnt", float, "number", "guidance weight: away from negative prompt"
    ),
)


# ---------------------------------------------------------------------------------------------
# accepted ranges and choices (the one table; types come from the defaults files)


@dataclass(frozen=True)
class Limit:
    """What a key accepts beyond its type: `test(value)` is true for accepted values."""

    test: Callable[[Any], bool]
    accepted: str


def _ge(low: float) -> Limit:
    return Limit(lambda v: v >= low, f">= {low}")


def _gt(low: float) -> Limit:
    return Limit(lambda v: v > low, f"> {low}")


def _within(low: float, high: float) -> Limit:
    return Limit(lambda v: low <= v <= high, f"in [{low}, {high}]")


def _one_of(*options: str) -> Limit:
    return Limit(lambda v: v in options, " | ".join(options))


# Choices that code outside the config layer checks as well (for direct Python use): one list.
ROPE_KINDS = ("paper", "aligned")  # model.rope_time
FUSION_ADALN = ("partner", "own")  # model.fusion_adaln
FUSION_VIDEO = ("change", "mean")  # model.fusion_video
AUDIO_CONTEXTS = ("audioldm2", "joint")  # model.audio_context ("" = the model size's)
# The tensors of AudioLDM2's prompt encoding (model.audio_context audioldm2), named after the
# UNet arguments they feed: GPT-2 tokens (encoder_hidden_states), FLAN-T5 states
# (encoder_hidden_states_1) and their mask. Cache records and sampling conditions hold them for
# the caption, and under "null_" those of the empty prompt (a dropped text, for the audio expert,
# as in AudioLDM2's guidance); sampling conditions under "neg_" those of the negative prompt.
AUDIO_PROMPT = ("audio_cond", "audio_cond_1", "audio_cond_1_mask")
LATENT_DRAWS = ("sample", "mean")  # train.latents

_FRACTION = _within(0, 1)
LIMITS: dict[str, Limit] = {
    "data.fps": _gt(0),
    "data.duration": _gt(0),
    "data.sample_rate": _ge(1),
    "data.synth.num_train": _ge(1),
    "data.synth.num_test": _ge(0),
    "data.synth.min_events": _ge(0),
    "data.synth.max_events": _ge(1),
    "data.synth.min_gap": _ge(1),
    "data.synth.flash_area": _one_of("object", "frame"),
    "cache.max_fail_frac": _FRACTION,
    "cache.window": _one_of("center", "start"),
    "cache.first_frame_draws": _ge(1),
    "cache.no_audio": _one_of("fail", "silence"),
    "codecs.video_decode_chunk": _ge(0),
    "codecs.video_encode_batch": _ge(1),
    "codecs.tiny.train_clips": _ge(1),
    "codecs.tiny.val_clips": _ge(1),
    "codecs.tiny.video_steps": _ge(0),
    "codecs.tiny.audio_steps": _ge(0),
    "codecs.tiny.vocoder_steps": _ge(0),
    "codecs.tiny.batch": _ge(1),
    "codecs.tiny.video_batch": _ge(1),
    "codecs.tiny.video_crop": _ge(8),
    "codecs.tiny.mel_crop": _ge(4),
    "codecs.tiny.lr": _gt(0),
    "codecs.tiny.flash_bar": _FRACTION,
    "codecs.tiny.onset_bar": _FRACTION,
    "demo.num_samples": _ge(1),
    "demo.long_factor": _ge(1),
    "diffusion.video_sigma_min": _gt(0),
    "diffusion.video_sigma_max": _gt(0),
    "diffusion.video_rho": _gt(0),
    "diffusion.audio_num_train_timesteps": _ge(2),
    "diffusion.audio_beta_start": _gt(0),
    "diffusion.audio_beta_end": _gt(0),
    "diffusion.audio_beta_schedule": _one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "diffusion.audio_steps_offset": _ge(0),
    "diffusion.audio_timestep_spacing": _one_of("leading", "trailing", "linspace"),
    "diffusion.audio_channels": _ge(1),
    "diffusion.audio_bins": _ge(1),
    "diffusion.cond_aug": _ge(0),
    "diffusion.p_drop_image": _FRACTION,
    "diffusion.p_drop_text": _FRACTION,
    "diffusion.p_iso": _FRACTION,
    "diffusion.p_indep_t": _FRACTION,
    "diffusion.event_weight": _ge(0),
    "diffusion.audio_prediction": _one_of("epsilon", "v"),
    "diffusion.audio_loss": _one_of("eps", "v", "v2a"),
    "diffusion.audio_loss_max": _ge(1),
    "eval.bootstrap": _ge(1),
    "eval.shuffles": _ge(1),
    "eval.seed": _ge(0),
    "eval.clips_per_video": _ge(1),
    "eval.fd_bootstrap": _ge(1),
    "eval.split": _one_of("train", "test", "val"),
    "infer.mode": _one_of("joint", "v2a", "a2v"),
    "infer.steps": _ge(1),
    "infer.seed": _ge(0),
    "infer.decode_chunk": _ge(0),
    "memory.max_t": _ge(0),
    "memory.q_chunk_v": _ge(0),
    "memory.q_chunk_a": _ge(0),
    "memory.kv_downsample": _ge(1),
    "memory.precision": _one_of("no", "bf16", "fp16"),
    "model.image_emb_dim": _ge(1),
    "model.text_emb_dim": _ge(1),
    "model.video_fps": _gt(0),
    "model.audio_latent_rate": _gt(0),
    "model.motion_bucket_id": _ge(0),
    "model.joint_dim": _ge(0),
    "model.joint_heads": _ge(0),
    "model.rope_time": _one_of(*ROPE_KINDS),
    "model.rope_time_fraction": Limit(lambda v: 0 < v <= 1, "in (0, 1]"),
    "model.rope_max_seconds": _gt(0),
    "model.fusion_adaln": _one_of(*FUSION_ADALN),
    "model.fusion_video": _one_of(*FUSION_VIDEO),
    "model.audio_context": _one_of("", *AUDIO_CONTEXTS),
    "run.seed": _ge(0),
    "train.latents": _one_of(*LATENT_DRAWS),
    "train.batch_size": _ge(1),
    "train.grad_accum": _ge(1),
    "train.lr": _gt(0),
    "train.betas": Limit(
        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"
    ),
    "train.weight_decay": _ge(0),
    "train.warmup_steps": _ge(0),
    "train.max_grad_norm": _ge(0),
    "train.max_steps": _ge(1),
    "train.ema_decay": _FRACTION,
    "train.lora_rank": _ge(0),
    "train.lora_alpha": _ge(0),
    "train.save_every": _ge(1),
    "train.keep_last": _ge(0),
    "train.log_every": _ge(1),
    "train.preview_every": _ge(0),
    "ui.port": _within(1, 65535),
    "ui.max_queue": _ge(1),
}


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _check_limit(key: str, value: Any, source: str) -> None:
    if not _finite(value):
        raise UserError(f"{source}: key '{key}' is {value!r}; accepted: a finite number")
    limit = LIMITS.get(key)
    if limit is None or value is None:
        return
    try:
        ok = limit.test(value)
    except TypeError:  # e.g. a list entry that is not a number
        ok = False
    if not ok:
        raise UserError(f"{source}: key '{key}' is {value!r}; accepted: {limit.accepted}")


# ---------------------------------------------------------------------------------------------
# loading


def schema() -> dict[str, Any]:
    """All defaults, one section per file in jointdit/defaults/."""
    out: dict[str, Any] = {}
    for path in sorted(DEFAULTS_DIR.glob("*.yaml")):
        body = _load_yaml(path.read_text()) or {}
        if not isinstance(body, dict):
            raise RuntimeError(f"{path}: a defaults file must hold a mapping")
        out[path.stem] = body
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file with its `_base_:` chain merged underneath it."""
    path = path.resolve()
    if path in chain:
        raise UserError(f"config {path}: `_base_` cycle through {' -> '.join(map(str, chain))}")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path}: the top level must be a mapping of sections")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, _read_yaml(path.parent / base, (*chain, path)))
    return _merge(merged, data)


def _merge(low: dict[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for k, v in high.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _typename(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


# Keys that take an integer (square frames) or a [height, width] pair; read them with frame_hw.
FRAME_SIZE_KEYS = ("data.size",)


def frame_hw(size: Any) -> tuple[int, int]:
    """Frame (height, width) from `data.size` or a config holding it: an int means square."""
    if isinstance(size, DictConfig):
        size = size.data.size
    if isinstance(size, ListConfig):
        size = list(size)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size, size
    if (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        return int(size[0]), int(size[1])
    raise UserError(
        f"data.size={size!r} is not accepted; use a positive integer (square frames) or "
        "[height, width], e.g. [320, 576] for the paper's 576x320 clip"
    )


def _coerce(key: str, default: Any, value: Any, source: str) -> Any:
    """Check `value` against the type of `default`; return it (ints become floats where needed)."""
    if default is None or value is None:
        return value
    if key in FRAME_SIZE_KEYS:
        try:
            hw = frame_hw(value)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        return hw[0] if isinstance(value, int) else list(hw)
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise UserError(f"{source}: key '{key}' expects a mapping, got {value!r}")
        if not default:  # an empty default mapping is free-form (e.g. class names)
            return dict(value)
        return _check_tree(default, value, source, prefix=f"{key}.")
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        list: lambda v: isinstance(v, (list, tuple)),
    }[type(default)]
    if isinstance(default, bool) and isinstance(value, str):
        try:  # yes / no / on / off are plain words to the loader; a boolean key takes them
            value = _bool({"on": "yes", "off": "no"}.get(value.strip().lower(), value))
        except KeyError:
            pass
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string; a number is meant
            value = float(value)
        except ValueError:
            pass
    if not ok(value):
        raise UserError(f"{source}: key '{key}' expects {_typename(default)}, got {value!r}")
    if isinstance(default, float):
        value = float(value)
    elif isinstance(default, str):
        value = str(value)
    elif isinstance(default, list):
        value = list(value)
    _check_limit(key, value, source)
    return value


def _check_tree(
    default: Mapping[str, Any], data: Mapping[str, Any], source: str, prefix: str = ""
) -> dict[str, Any]:
    out = dict(default)
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in default:
            near = ", ".join(sorted(default)) or "(none)"
            raise UserError(f"{source}: unknown key '{key}' (known here: {near})")
        out[k] = _coerce(key, default[k], v, source)
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set tree[a][b][c] = value for 'a.b.c', type-checked against what is there."""
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            raise UserError(f"{source}: unknown key '{'.'.join(parts[: i + 1])}'")
        node = nxt
    leaf = parts[-1]
    if leaf not in node:
        raise UserError(f"{source}: unknown key '{dotted}'")
    node[leaf] = _coerce(dotted, node[leaf], value, source)


def parse_override(item: str, source: str = "command line") -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"{source}: override {item!r} must look like key=value")
    key, text = item.split("=", 1)
    try:
        value = _load_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    make_vars: Mapping[str, str] | None = None,
) -> DictConfig:
    """Resolve a config: defaults < YAML (+bases) < env knobs < `make_vars` < `overrides`.

    `make_vars` maps Make/environment variable names (e.g. STEPS) to config keys; a set,
    non-empty variable overrides its key and errors name the variable.
    """
    env = os.environ if env is None else env
    tree = schema()
    if path is not None:
        tree = _check_tree(tree, _read_yaml(Path(path)), source=f"config {path}")
    for knob in KNOBS:
        text = env.get(knob.env)
        if text is None or text == "":
            continue
        try:
            value = knob.parse(text)
        except (ValueError, KeyError):
            raise UserError(
                f"environment: {knob.env}={text!r} is malformed; accepted: {knob.accepted}"
            ) from None
        _set(tree, knob.key, value, source=f"environment {knob.env}")
    for var, key in (make_vars or {}).items():
        text = env.get(var)
        if text is None or text == "":
            continue
        _, value = parse_override(f"{key}={text}", source=var)
        _set(tree, key, value, source=f"variable {var}={text!r}")
    for item in overrides:
        key, value = parse_override(item)
        _set(tree, key, value, source=f"override {item!r}")
    cfg = OmegaConf.create(tree)
    OmegaConf.set_struct(cfg, True)
    return cfg


# Keys a run's saved config may predate, with the value that reproduces how such a run was made
# (a saved resolved config holds every key of its time).
SAVED_BEFORE = {"model.audio_context": "joint"}


def load_saved_config(path: str | os.PathLike) -> DictConfig:
    """A run's saved resolved config (checkpoints); keys it predates take SAVED_BEFORE's."""
    saved = _read_yaml(Path(path))
    cfg = load_config(path)
    for key, value in SAVED_BEFORE.items():
        section, name = key.split(".")
        if name not in (saved.get(section) or {}):
            cfg[section][name] = value
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def portable_path(path: str | os.PathLike) -> str:
    """A path as configs store it: relative to the repo root when it lies under it, so the
    same run means the same text wherever the repo is cloned, copied or moved."""
    p = Path(path)
    if p.is_absolute():
        try:
            return str(p.resolve().relative_to(REPO_ROOT))
        except ValueError:
            pass
    return str(path)


def _portable(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _portable(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_portable(v) for v in data]
    if isinstance(data, str) and data.startswith(os.sep):
        return portable_path(data)
    return data


def fingerprint(cfg: DictConfig, sections: Iterable[str] | None = None) -> str:
    """A short hash of the resolved config (or of some of its sections). Absolute paths under
    the repo count as their repo-relative form, so the hash does not depend on where it lives."""
    data = to_dict(cfg)
    if sections is not None:
        data = {s: data.get(s) for s in sections}
    blob = json.dumps(_portable(data), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_resolved(cfg: DictConfig, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a job's outputs (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, target)
    return target


def repo_path(path: str | os.PathLike) -> Path:
    """Config paths are relative to the repo root unless absolute."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p
