"""The weight files of the evaluation networks: one registry, user-placed, never downloaded.

Every network an evaluation metric needs loads a file (or a folder) that the user puts into the
weights folder (`eval.weights_dir`, default checkpoints/eval/) by hand. Nothing here, nor in any
loader, fetches anything: a missing file is reported with its name, the folder it belongs in and
where it is published, and the metric is skipped.

Each entry names its loader as "module:function" and is imported only when the file is there,
so a metric's network code is read only when it runs (and the registry is the one place to
plug another network in).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jointdit.config import repo_path


@dataclass(frozen=True)
class WeightFile:
    """A network's weights as the user places them.

    `names`: accepted file (or folder) names, any one of them; `url`: where it is published
    (fetched by the user, never by this code); `licence`: the weights' terms; `loader`:
    "module:function" taking the path and returning the network; `random`: "module:function"
    (path, small) writing a random-weight file under the first name, with the published keys.
    """

    names: tuple[str, ...]
    url: str
    licence: str
    loader: str
    network: str  # what it is, for the docs and the skip line
    random: str

    def find(self, folder: Path) -> Path | None:
        """The first accepted name present in `folder`, else None."""
        return next((folder / n for n in self.names if (folder / n).exists()), None)

    def load(self, path: Path) -> Any:
        return _function(self.loader)(path)


def _function(where: str) -> Callable[..., Any]:
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


WEIGHTS: dict[str, WeightFile] = {
    "i3d": WeightFile(
        names=("i3d_torchscript.pt", "i3d_pretrained_400.pt"),
        url="https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1 (StyleGAN-V's, "
        "used by ASVA); i3d_pretrained_400.pt: VideoGPT's, Google Drive id "
        "1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT (used by TATS, MM-Diffusion)",
        licence="Apache-2.0 (DeepMind kinetics-i3d)",
        loader="jointdit.evaluation.i3d:load",
        network="I3D Inception-v1, Kinetics-400 logits (400-d)",
        random="jointdit.evaluation.i3d:random_weights",
    ),
    "vggish": WeightFile(
        names=("vggish-10086976.pth",),
        url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
        licence="Apache-2.0",
        loader="jointdit.evaluation.vggish:load",
        network="VGGish, AudioSet (128-d, no PCA, no final ReLU)",
        random="jointdit.evaluation.vggish:random_weights",
    ),
    "imagebind": WeightFile(
        names=("imagebind_huge.pth",),
        url="https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth",
        licence="CC BY-NC-SA 4.0 (non-commercial)",
        loader="jointdit.evaluation.imagebind:load",
        network="ImageBind-huge vision and audio encoders (1024-d)",
        random="jointdit.evaluation.imagebind:random_weights",
    ),
    "clip": WeightFile(
        names=("clip",),
        url="https://huggingface.co/openai/clip-vit-large-patch14 (the whole repo, saved as a "
        "folder named clip)",
        licence="MIT",
        loader="jointdit.evaluation.text_scores:load_clip",
        network="CLIP ViT-L/14 (transformers CLIPModel + CLIPProcessor)",
        random="jointdit.evaluation.text_scores:random_clip",
    ),
    "clap": WeightFile(
        names=("clap",),
        url="https://huggingface.co/laion/larger_clap_music_and_speech (the whole repo, saved "
        "as a folder named clap)",
        licence="Apache-2.0",
        loader="jointdit.evaluation.text_scores:load_clap",
        network="LAION-CLAP HTSAT (transformers ClapModel + ClapProcessor)",
        random="jointdit.evaluation.text_scores:random_clap",
    ),
}


def weights_dir(cfg: Any) -> Path:
    """The weights folder of a config (`eval.weights_dir`, relative to the repo root)."""
    return repo_path(cfg.eval.weights_dir)


def skip_line(metrics: str, weights: WeightFile, folder: Path) -> str:
    """The one line `make eval` prints for a metric it skips."""
    names = " or ".join(weights.names)
    return f"skip {metrics}: no {names} in {folder}/ (published at {weights.url})"


def write_random_weights(folder: str | Path, small: bool = True) -> list[Path]:
    """Random-weight files for every network, under the names the user would place (reduced
    widths when `small`): the whole suite runs on them, for tests and dry runs. The scores
    mean nothing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / w.names[0] for w in WEIGHTS.values()]
    for w, path in zip(WEIGHTS.values(), paths):
        _function(w.random)(path, small)
    return paths
