"""The data benchmark runs end to end and prints its figures (it never judges them)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_prints_build_and_epoch_seconds_for_cached_and_streamed_data():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), "--rows", "16", "8", "8", "--context",
                           "64", "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads([line for line in done.stdout.splitlines() if line.strip()][-1])
    assert figures["rows"] == {"image": 16, "audio": 8, "video": 8}
    for variant in ("cached", "streamed"):
        assert figures[variant]["build_seconds"] >= 0 and len(figures[variant]["epoch_seconds"]) == 1
