"""make eval DIR=...: sync score and AV-Align of generated clips, each beside its chance level.

DIR (or --dir, repeatable) is a folder of clips as `make infer` writes them,
<DIR>/<group>/<clip_id>/out.mp4 + meta.json, or a folder of .mp4 files. Writes
<DIR>/metrics.json (per-clip and mean figures with paired-bootstrap 95% intervals, the
picture kept where the reference is readable, paired contrasts "joint - iso" and
"v2a - chance" per family) and prints the tables. Then the field's per-clip metrics that need
no reference set: AV-Align in its published form, and the ImageBind, CLIP and CLAP scores where
their weights are placed under eval.weights_dir (one skip line each where not), written to
<DIR>/published_metrics.json. FVD, KVD and FAD are make eval-avsync15's (docs/evaluation.md).
"""

import json
import os
import shlex
from pathlib import Path

from jointdit.cli import parser, run
from jointdit.config import load_config
from jointdit.evaluation.suite import score_folder
from jointdit.metrics import evaluate_dirs, format_table


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], default_config=None)
    p.add_argument(
        "--dir",
        action="append",
        default=[],
        help="folder of generated clips; repeat for several (default: $DIR, space-separated)",
    )
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    dirs = args.dir or shlex.split(os.environ.get("DIR", ""))
    results = evaluate_dirs(dirs, cfg)
    print(format_table(results))
    for d in dirs:
        print(f"wrote {os.path.join(d, 'metrics.json')}")
    for d in dirs:
        published, table = score_folder(Path(d), cfg)
        print(f"\n{d}: the field's per-clip metrics, 95% bootstrap intervals\n")
        print(table)
        (Path(d) / "published_metrics.json").write_text(json.dumps(published, indent=1))
        print(f"wrote {os.path.join(d, 'published_metrics.json')}")
    return 0


if __name__ == "__main__":
    run(main)
