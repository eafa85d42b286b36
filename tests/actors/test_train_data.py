"""What a TEAL stage reads: the prepared shards, weighted by the stage's mix, on a real local Ray."""
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.train_data import DataConfig, media_dataset, sequence_dataset

LENGTH = 8


def _write_shard(folder: Path, name: str, markers: list[int]) -> None:
    """Packed rows as prepare writes them, each row's ids all equal to its marker."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"input_ids": [m] * LENGTH, "loss_mask": [1] * LENGTH,
                                          "doc_ids": [0] * LENGTH, "position_ids": list(range(LENGTH))}
                                         for m in markers]), folder / name)


@pytest.fixture
def prepared(tmp_path) -> Path:
    _write_shard(tmp_path / "train", "part-00000-image-0000.parquet", list(range(40)))
    _write_shard(tmp_path / "train", "part-00001-audio-0000.parquet", list(range(1000, 1010)))
    return tmp_path


def _markers(ds) -> list[int]:
    return [int(row["input_ids"][0]) for row in ds.iter_rows()]


def test_a_mix_weighs_each_modality_and_interleaves_them_the_same_way_every_epoch(ray_local, prepared):
    ds = sequence_dataset(DataConfig(path=str(prepared), mix={"image": 1, "audio": 2}), "train")
    first, second = _markers(ds), _markers(ds)
    assert sorted(first) == list(range(40)) + sorted(2 * list(range(1000, 1010)))
    assert first == second                       # a resumed run reads what the uninterrupted one would
    # shuffled by row: audio rows (a third of the epoch) are spread through it, not read after every image row
    assert sum(m >= 1000 for m in first[:30]) >= 5 and sum(m >= 1000 for m in first[30:]) >= 5


def test_an_epoch_is_the_same_however_the_shard_reads_race(ray_local, tmp_path):
    # shards of one modality, as prepare writes them: Ray Data lists and reads them in parallel, and which
    # finishes first must not decide the epoch (a run would not repeat, nor a resumed one read what it would have)
    for k in range(4):
        _write_shard(tmp_path / "train", f"part-{k:05d}-image-0000.parquet", list(range(250 * k, 250 * k + 250)))
    config = DataConfig(path=str(tmp_path), mix={"image": 1})
    context = ray_local.data.DataContext.get_current()
    context.execution_options.preserve_order = True      # Ray Data's own switch for determinism, process-wide
    try:
        in_file_order = _markers(sequence_dataset(config, "train"))
    finally:
        context.execution_options.preserve_order = False
    for _ in range(5):                                   # read out of order, nearly every read of these differs
        assert _markers(sequence_dataset(config, "train")) == in_file_order


def test_small_data_is_read_into_the_object_store_once_and_larger_data_streams(ray_local, prepared):
    config = DataConfig(path=str(prepared), mix={"image": 1, "audio": 1})
    cached = sequence_dataset(config, "train")
    streamed = sequence_dataset(replace(config, cache_max_mb=0), "train")
    assert sorted(_markers(streamed)) == sorted(_markers(cached))
    for shard in (prepared / "train").iterdir():      # later epochs must not need the files any more ...
        shard.unlink()
    assert len(_markers(cached)) == 50
    with pytest.raises(Exception):                    # ... as a streamed epoch does
        _markers(streamed)


def test_a_small_media_split_is_decoded_once_and_later_epochs_need_no_files(ray_local, tmp_path):
    from actors.tokenize import PreprocessConfig
    from models.preprocess import ImagePreprocessConfig
    from workflows.demo_data import DemoDataConfig, build_demo_data

    build_demo_data(DemoDataConfig(out=str(tmp_path / "data"), images=20, audio_per_digit=0, videos=0, seed=1))
    config = DataConfig(kind="media", path=str(tmp_path / "data" / "manifest.jsonl"), modality="image")
    preprocess = PreprocessConfig(image=ImagePreprocessConfig(size=16))
    cached = media_dataset(config, "train", preprocess)
    streamed = media_dataset(replace(config, cache_max_mb=0), "train", preprocess)
    ids = sorted(row["id"] for row in cached.iter_rows())
    assert len(ids) >= 10 and ids == sorted(row["id"] for row in streamed.iter_rows())
    for image in (tmp_path / "data").rglob("*.png"):
        image.unlink()
    assert sorted(row["id"] for row in cached.iter_rows()) == ids
    assert list(streamed.iter_rows()) == []          # a streamed epoch reads the files again: all missing now
