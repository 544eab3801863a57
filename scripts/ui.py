"""Serve the Gradio app: `make ui [CKPT=...] [PORT=7860] [UI_AUTH=user:pass]`."""

import os

from jointdit.cli import parser, run
from jointdit.config import load_config

# Make variables -> config keys (a bad value is reported under the variable's name).
# UI_AUTH is read separately: it holds a password, which must not land in a config.
MAKE_VARS = {"CKPT": "infer.ckpt", "PORT": "ui.port"}


def main(argv: list[str] | None = None) -> int:
    args = parser("Serve the JointDiT Gradio app.", "configs/infer.yaml").parse_args(argv)
    cfg = load_config(args.config, args.overrides, make_vars=MAKE_VARS)

    from jointdit.ui import launch

    app = launch(cfg, auth=os.environ.get("UI_AUTH", ""))
    print(f"JointDiT UI on {app.local_url} (Ctrl-C stops it)", flush=True)
    app.block_thread()
    return 0


if __name__ == "__main__":
    run(main)
