"""Download the pretrained SVD / AudioLDM2 / CLIP-text parts (make fetch-models)."""

from jointdit.cli import parser, run
from jointdit.codecs.fetch import fetch_models
from jointdit.config import load_config


def main() -> int:
    p = parser(__doc__.splitlines()[0], "configs/avsync15.yaml")
    p.add_argument(
        "--only", action="append", metavar="NAME", help="fetch only this source (repeatable)"
    )
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    fetch_models(cfg.codecs, names=args.only)
    return 0


if __name__ == "__main__":
    run(main)
