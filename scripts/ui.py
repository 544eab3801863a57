"""Serve the Gradio app: `make ui [CKPT=...] [PORT=7860] [UI_AUTH=user:pass]`."""

import os

from jointdit.cli import parser, run
from jointdit.config import load_config
from jointdit.errors import UserError

# Make variables -> config keys (a bad value is reported under the variable's name).
# UI_AUTH is read separately: it holds a password, which must not land in a config.
MAKE_VARS = {"CKPT": "infer.ckpt", "PORT": "ui.port"}


def main(argv: list[str] | None = None) -> int:
    args = parser("Serve the JointDiT Gradio app.", "configs/infer.yaml").parse_args(argv)
    cfg = load_config(args.config, args.overrides, make_vars=MAKE_VARS)

    from jointdit.checkpoint import resolve_checkpoint
    from jointdit.config import repo_path
    from jointdit.ui import launch

    if os.environ.get("CKPT"):  # asked for by name: it must exist (the default may not yet)
        try:
            resolve_checkpoint(repo_path(cfg.infer.ckpt))
        except UserError as e:
            raise UserError(f"CKPT={cfg.infer.ckpt}: {e}") from None

    app = launch(cfg, auth=os.environ.get("UI_AUTH", ""))
    print(f"JointDiT UI on {app.local_url} (Ctrl-C stops it)", flush=True)
    app.block_thread()
    return 0


if __name__ == "__main__":
    run(main)
