"""The Serve benchmark runs end to end and prints its figures (it never judges them)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_prints_one_json_line_with_every_variant_and_ratio():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--requests", "4", "--max-tokens", "4",
                           "--concurrency", "1,2", "--rounds", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads([line for line in done.stdout.splitlines() if line.strip()][-1])
    for variant in ("batched", "unbatched", "batched_no_cache"):
        for level in ("c1", "c2"):
            assert figures["results"][variant][level]["errors"] == 0
            assert {"requests_per_s", "p50_ms", "p99_ms"} <= set(figures["results"][variant][level])
    assert set(figures["results"]["unbatched"]["batch_sizes"]) == {"1"}   # max_batch_size 1 really is off
    assert {"batching_rps_c2", "kv_cache_rps_c2", "decode_only_batching", "decode_only_kv_cache"} <= set(figures["ratios"])
