"""The tokenizers benchmark runs end to end and prints its figures (it never judges them)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from workflows.demo_data import DemoDataConfig, build_demo_data

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"image_vq_psnr_db", "image_vq_codebook_usage", "dynamic_tokens_per_image_mean", "dynamic_psnr_db",
        "audio_mel_l1", "audio_tokens_per_second", "video_psnr_db", "seconds"}


@pytest.mark.slow
def test_bench_prints_one_json_line_with_every_figure(tmp_path):
    data = tmp_path / "data"
    build_demo_data(DemoDataConfig(out=str(data), images=120, audio_per_digit=3, videos=12))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "tokenizers.py"), "--data", str(data),
                           "--out", str(tmp_path / "bench"), "--steps-scale", "0.01"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    figures = json.loads(lines[-1])
    assert KEYS <= set(figures)
    assert 20 <= figures["audio_tokens_per_second"] <= 30
    for name in ("image", "image_dynamic", "audio", "video"):
        assert (tmp_path / "bench" / "tokenizers" / name / "model.safetensors").is_file()
    assert (tmp_path / "bench" / "image_vq_reconstructions.png").is_file()
