import numpy as np
import pytest

from models.preprocess import (AudioPreprocessConfig, ImagePreprocessConfig, MediaError, VideoPreprocessConfig,
                               decode_array, encode_array, preprocess_audio, preprocess_image, preprocess_video)

IMAGE = ImagePreprocessConfig(size=32, max_pixels=1_000_000)
AUDIO = AudioPreprocessConfig(sample_rate=16000, max_seconds=2.0)
VIDEO = VideoPreprocessConfig(size=32, fps=4, max_frames=3)


def run(modality: str, data: bytes) -> np.ndarray:
    return {"image": lambda: preprocess_image(data, IMAGE), "audio": lambda: preprocess_audio(data, AUDIO),
            "video": lambda: preprocess_video(data, VIDEO)}[modality]()


def test_every_case_is_accepted_or_refused_with_its_reason(media_cases):
    for name, (modality, data, reason) in media_cases.items():
        if reason is None:
            run(modality, data)
        else:
            with pytest.raises(MediaError) as err:
                run(modality, data)
            assert err.value.reason == reason, (name, err.value.reason, str(err.value))
            assert str(err.value), name


def test_images_come_out_rgb_at_the_tokenizer_size(media_cases):
    for name in ("good.png", "cmyk.jpg", "sixteen_bit.png", "palette.png"):
        out = preprocess_image(media_cases[name][1], IMAGE)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
    assert 60 < preprocess_image(media_cases["sixteen_bit.png"][1], IMAGE).mean() < 200   # scaled, not clipped


def test_exif_orientation_is_applied():
    import io

    from PIL import Image

    image = Image.new("RGB", (64, 32), "white")
    image.paste((0, 0, 0), (0, 0, 32, 32))                 # left half black
    exif = Image.Exif()
    exif[0x0112] = 6                                       # "rotate 90 clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    out = preprocess_image(buffer.getvalue(), ImagePreprocessConfig(size=32))
    assert out.shape == (32, 32, 3) and out[:4].mean() < 60          # black now on top


def test_a_wide_image_is_centre_cropped():
    import io

    from PIL import Image

    image = Image.new("RGB", (96, 32), "white")
    image.paste((0, 0, 0), (32, 0, 64, 32))                 # the middle third black
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert preprocess_image(buffer.getvalue(), ImagePreprocessConfig(size=32)).mean() < 5


def test_audio_is_mono_resampled_and_trimmed(media_cases):
    out = preprocess_audio(media_cases["eight_channel_48k.wav"][1], AUDIO)
    assert out.ndim == 1 and out.dtype == np.float32 and len(out) == 16000          # 1 s at 16 kHz
    short = preprocess_audio(media_cases["eight_channel_48k.wav"][1], AudioPreprocessConfig(max_seconds=0.25))
    assert len(short) == 4000
    padded = preprocess_audio(media_cases["speech.wav"][1], AudioPreprocessConfig(max_seconds=2.0, pad_to_max=True))
    assert len(padded) == 32000


def test_video_frames_are_sampled_resized_and_capped(media_cases):
    frames = preprocess_video(media_cases["clip.mp4"][1], VIDEO)
    assert frames.shape == (3, 32, 32, 3)     # 8 frames at 8 fps, kept at 4 fps: 0, 2, 4, 6, capped at 3
    frames = preprocess_video(media_cases["clip.mp4"][1], VideoPreprocessConfig(size=16, fps=8, max_frames=5))
    assert frames.shape == (5, 16, 16, 3)


def test_arrays_travel_as_npy_bytes():
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    assert np.array_equal(decode_array(encode_array(array)), array)
