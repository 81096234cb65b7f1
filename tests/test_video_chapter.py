"""The video chapter's one library switch: `VideoConfig.centre_frames` (the tower subtracts the clip's mean frame, so a
still scene carries nothing and only what changes reaches the tubelets) and the recipes' `video_centre` knob that turns it on.
The chapter's own cells assert its results (single frame at chance, video-text above it); these pin the switch."""
import pytest
import torch

from mmlab.core import ConfigError
from mmlab.encoders import VideoConfig, VideoEncoder
from mmlab.recipes import ClipRecipe, build_model, get_recipe

torch.set_num_threads(1)


def tower(**kw):
    torch.manual_seed(0)
    return VideoEncoder(VideoConfig.preset("tiny", **kw)).eval()


def test_centred_tower_ignores_the_still_scene():
    t = tower(centre_frames=True)
    clip = torch.rand(3, 8, 3, 32, 32)
    scene = torch.rand(3, 1, 3, 32, 32)                                        # one still image added to every frame
    out, shifted = t(clip), t(clip + scene)
    torch.testing.assert_close(shifted.tokens, out.tokens, atol=1e-5, rtol=1e-5)
    still = t(scene.expand(-1, 8, -1, -1, -1)).tokens                          # a still clip is an empty clip
    torch.testing.assert_close(still, t(torch.zeros(3, 8, 3, 32, 32)).tokens, atol=1e-5, rtol=0)   # the mean rounds in float32


def test_centring_is_the_plain_tower_on_the_frame_differences_from_the_mean():
    plain, centred = tower(), tower(centre_frames=True)
    centred.load_state_dict(plain.state_dict())                                # same weights, the switch alone differs
    clip = torch.rand(2, 8, 3, 32, 32, dtype=torch.float64)
    ref = plain.double()(clip - clip.mean(1, keepdim=True)).tokens              # float64 reference, the mean taken by hand
    torch.testing.assert_close(centred.double()(clip).tokens, ref, atol=1e-10, rtol=0)
    assert not torch.allclose(plain(clip).tokens, ref)                          # off by default: the scene is kept
    assert VideoConfig().centre_frames is False


def test_the_recipes_video_centre_knob_builds_a_centred_tower():
    on = get_recipe("clip", dataset="motion", modalities="video,text", video_centre="true")    # as the CLI passes it
    assert build_model(on).encoder("video").config.centre_frames is True
    off = build_model(get_recipe("clip", dataset="motion", modalities="video,text"))
    assert off.encoder("video").config.centre_frames is False                  # off by default: the preset's tower
    assert get_recipe("videomae").make_model().encoder("video").config.centre_frames is False
    with pytest.raises(ConfigError, match=r"--video_centre 'yes' is not a valid bool"):
        get_recipe("clip", dataset="motion", modalities="video,text", video_centre="yes")
    with pytest.raises(ConfigError, match=r"clip\.video_centre='on': expected one of True, False"):
        ClipRecipe(dataset="motion", modalities="video,text", video_centre="on")   # from Python, not a bool
