"""The synthetic set's full-frame flash option (a flash-and-beep stimulus that weighs in the loss)."""

import numpy as np
import pytest

from jointdit.config import load_config
from jointdit.data.synthetic import _settings, class_table, make_clip
from jointdit.errors import UserError


def _clip(area):
    data = load_config(overrides=[f"data.synth.flash_area={area}"]).data
    lamp = class_table(("red_lamp_beep",))[0]
    return make_clip(lamp, np.random.default_rng([0, 0, 0]), _settings(data, seed=0))


def test_frame_flash_lights_the_whole_frame_only_at_events():
    side_o, frames_o, audio_o = _clip("object")
    side_f, frames_f, audio_f = _clip("frame")
    assert side_f["event_frames"] == side_o["event_frames"] and "flash_area" not in side_o
    assert side_f["flash_area"] == "frame"
    events = side_f["event_frames"]
    corner = frames_f[:, 0, 0, 0].float()  # red channel of a background pixel
    assert all(corner[k] > 100 for k in events)  # lit in the lamp's colour
    quiet = [k for k in range(len(corner)) if k not in events]
    assert (frames_f[quiet] == frames_o[quiet]).all()  # nothing else changes
    assert (audio_f == audio_o).all()


def test_unknown_flash_area_names_the_key():
    with pytest.raises(UserError, match="data.synth.flash_area' is 'everywhere'; accepted: object"):
        _clip("everywhere")
