"""Sample a sounding video: `make infer CKPT=... REF=... PROMPT=... STEPS=30 SEED=7 WV=1.5 ...`."""

from pathlib import Path

from tqdm.auto import tqdm

from jointdit.cli import parser, run
from jointdit.config import load_config, repo_path
from jointdit.errors import UserError

# Make variables -> config keys (a bad value is reported under the variable's name).
MAKE_VARS = {
    "CKPT": "infer.ckpt",
    "REF": "infer.ref",
    "IMAGE": "infer.image",
    "PROMPT": "infer.prompt",
    "NEG_PROMPT": "infer.neg_prompt",
    "STEPS": "infer.steps",
    "SEED": "infer.seed",
    "WV": "infer.wv",
    "WA": "infer.wa",
    "WI": "infer.wi",
    "WI_FIRST": "infer.wi_first",
    "WT": "infer.wt",
    "WNT": "infer.wnt",
    "MODE": "infer.mode",
    "VIDEO": "infer.video",
    "AUDIO": "infer.audio",
    "OUT": "infer.out",
}


def main(argv: list[str] | None = None) -> int:
    p = parser("Generate a sounding video from an image.", "configs/infer.yaml")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides, make_vars=MAKE_VARS)

    from jointdit.checkpoint import resolve_checkpoint
    from jointdit.pipeline import USED_CONFIG, Generator, check_request, request_from_config

    req = request_from_config(cfg.infer)
    check_request(req)  # every file and the output folder, before the model is loaded
    try:
        ckpt = resolve_checkpoint(repo_path(cfg.infer.ckpt))
    except UserError as e:
        raise UserError(f"CKPT={cfg.infer.ckpt}: {e}") from None
    gen = Generator(str(ckpt), ema=cfg.infer.ema)
    with tqdm(total=req.steps, desc="sampling", unit="step") as bar:
        result = gen.generate(req, progress=lambda k, n: bar.update(1))
    out = Path(result.out_dir)
    print(
        f"wrote {result.video_path}, {result.preview_path}, {out / 'meta.json'}, "
        f"{out / USED_CONFIG}"
    )
    return 0


if __name__ == "__main__":
    run(main)
