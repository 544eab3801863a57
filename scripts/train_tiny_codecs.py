"""Train the tiny embedded codecs on the synthetic set and report their quality (make tiny-models)."""

from jointdit.cli import parser, run
from jointdit.codecs.tiny_train import train_tiny_codecs
from jointdit.config import load_config


def main() -> int:
    args = parser(__doc__.splitlines()[0], "configs/demo/base.yaml").parse_args()
    train_tiny_codecs(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    run(main)
