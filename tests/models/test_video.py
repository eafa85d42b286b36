import pytest
import torch

from models import ImageVQTokenizer, VideoConfig, VideoTokenizer
from models.media import read_mp4, write_mp4
from models.video import sample_frame_indices


@pytest.mark.parametrize("frames, source_fps, fps, max_frames, expected", [
    (16, 8.0, 4.0, 16, [0, 2, 4, 6, 8, 10, 12, 14]),
    (16, 8.0, 4.0, 3, [0, 2, 4]),
    (5, 2.0, 4.0, 16, [0, 1, 2, 3, 4]),          # never more frames than the source has
    (10, 30.0, 4.0, 16, [0, 8]),
    (1, 8.0, 4.0, 16, [0]),
])
def test_frames_are_sampled_at_the_configured_rate(frames, source_fps, fps, max_frames, expected):
    assert sample_frame_indices(frames, source_fps, fps, max_frames) == expected


def test_shares_the_image_tokenizers_weights(tiny_image_vq_config, seeded):
    image = ImageVQTokenizer(tiny_image_vq_config()).eval()
    video = VideoTokenizer(VideoConfig(fps=4, max_frames=8), image_tokenizer=image).eval()
    assert video.image is image
    frames = torch.rand(5, 3, 32, 32)
    codes = video.encode([frames])
    assert len(codes) == 1 and codes[0].shape == (5, image.tokens_per_image)
    assert torch.equal(codes[0], image.encode(frames))


def test_clips_of_different_lengths_round_trip_through_mp4(tmp_path, tiny_image_vq_config, seeded):
    video = VideoTokenizer(VideoConfig(fps=4, max_frames=8), image_tokenizer=ImageVQTokenizer(tiny_image_vq_config()))
    video.eval()
    clips = [torch.rand(3, 3, 32, 32), torch.rand(6, 3, 32, 32)]
    rebuilt = video.decode(video.encode(clips))
    assert [c.shape for c in rebuilt] == [(3, 3, 32, 32), (6, 3, 32, 32)]
    write_mp4(rebuilt[1], tmp_path / "clip.mp4", fps=4)
    frames, fps = read_mp4(tmp_path / "clip.mp4")
    assert frames.shape == (6, 3, 32, 32) and fps == 4


def test_mp4_keeps_real_digit_frames_nearly_intact(tmp_path, digits):
    clip = digits[0][:12]
    write_mp4(clip, tmp_path / "digits.mp4", fps=8)
    frames, fps = read_mp4(tmp_path / "digits.mp4")
    assert frames.shape == clip.shape and fps == 8
    assert (frames - clip).abs().mean() < 0.02


def test_save_and_load_keep_the_frame_tokenizer(tmp_path, tiny_image_vq_config, seeded):
    video = VideoTokenizer(VideoConfig(fps=2, max_frames=4), image_tokenizer=ImageVQTokenizer(tiny_image_vq_config()))
    video.save_pretrained(tmp_path / "video")
    loaded = VideoTokenizer.from_pretrained(tmp_path / "video")
    clip = [torch.rand(4, 3, 32, 32)]
    assert torch.equal(video.eval().encode(clip)[0], loaded.encode(clip)[0])
    assert loaded.config == video.config


@pytest.mark.parametrize("clips, message", [
    ([torch.rand(9, 3, 32, 32)], "at most 8 frames, got 9"),
    ([torch.rand(2, 3, 16, 16)], r"clips\[0\].*\(B, 3, 32, 32\)"),
    ([torch.rand(3, 32, 32)], r"\(F, 3, H, W\)"),
    ([], "at least one clip"),
    (torch.rand(2, 3, 32, 32), r"\(B, F, 3, H, W\)"),
])
def test_bad_clips_are_refused(clips, message, tiny_image_vq_config):
    video = VideoTokenizer(VideoConfig(max_frames=8), image_tokenizer=ImageVQTokenizer(tiny_image_vq_config()))
    with pytest.raises(ValueError, match=message):
        video.encode(clips)
