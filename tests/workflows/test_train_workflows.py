"""The training commands end to end, as a user runs them (`anytoken train-tokenizer|train-clip|train-llm|train`),
on a real local Ray with 2 CPU workers and DeepSpeed, at sizes that train in seconds."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models import ImageVQConfig, ImageVQTokenizer, QuantizerConfig, load_pretrained
from models.exported import ExportedModel
from models.media import write_png
from models.sequences import media_text_documents, pack_documents
from models.vocabulary import JointVocabulary
from workflows import train, train_clip, train_llm, train_tokenizer
from workflows.config import CONFIG_DIR
from workflows.demo_data import WORDS

pytestmark = pytest.mark.slow
LOOP = ["loop.num_workers=2", "loop.micro_batch_size=8", "loop.log_every=2", "loop.checkpoint_every=3",
        "loop.optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, digits) -> Path:
    """64 real digit images (48 train, 16 val) with captions, as a manifest with relative paths."""
    root = tmp_path_factory.mktemp("data")
    images, labels = digits
    lines = []
    (root / "images").mkdir()
    for i in range(64):
        write_png(images[i], root / "images" / f"{i}.png")
        lines.append(json.dumps({"id": f"img-{i}", "modality": "image", "path": f"images/{i}.png",
                                 "text": f"the digit {WORDS[int(labels[i])]}", "label": int(labels[i]),
                                 "split": "train" if i < 48 else "val"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def common(tmp: Path, name: str, steps: int = 6) -> list[str]:
    return [f"--out={tmp / name}", f"loop.name={name}", f"loop.storage_path={tmp / 'ray'}", f"loop.steps={steps}",
            *LOOP]


def test_train_tokenizer_exports_a_tokenizer_that_loads_and_a_video_tokenizer_that_shares_it(
        ray_local, manifest, tmp_path):
    code = train_tokenizer.main([
        "kind=image_vq", "config_file=tokenizers/image_vq_demo.yaml", "config.channels=16",
        "config.quantizer.codebook_size=64", "config.quantizer.code_dim=16",
        "data.kind=media", f"data.path={manifest}", "data.modality=image", *common(tmp_path, "image")])
    assert code == 0
    image = load_pretrained(tmp_path / "image")
    assert isinstance(image, ImageVQTokenizer) and image.codebook_size == 64
    assert image.encode(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    assert (tmp_path / "image" / "metrics.jsonl").read_text().count("\n") == 3      # steps 2, 4, 6

    # nothing to train (loop.steps=0): the video tokenizer is built on the image tokenizer's very weights
    code = train_tokenizer.main(["kind=video", "config_file=tokenizers/video_demo.yaml",
                                 f"init_from={tmp_path / 'image'}", f"--out={tmp_path / 'video'}", "loop.steps=0"])
    assert code == 0
    video = load_pretrained(tmp_path / "video")
    frames = torch.rand(3, 3, 32, 32)
    assert torch.equal(video.encode([frames])[0], image.encode(frames))


def test_a_bad_training_config_is_an_error_that_names_it(ray_local, manifest, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_tokenizer.main(["kind=image_vq", "loop.stepz=3"])
    assert "unknown config key 'loop.stepz'" in capsys.readouterr().err
    assert train_tokenizer.main(["kind=image_vq", "data.kind=media", f"data.path={manifest}",
                                 "data.modality=audio", *common(tmp_path, "none")]) == 1


def test_train_clip_exports_a_scorer_with_its_words(ray_local, manifest, text_tokenizer_path, tmp_path):
    from models.clip import load_clip_scorer

    code = train_clip.main([f"data.path={manifest}", f"data.text_tokenizer={text_tokenizer_path}",
                            "config.channels=16", "config.embed_dim=32", "config.text_width=32",
                            *common(tmp_path, "clip")])
    assert code == 0
    words = (tmp_path / "clip" / "words.txt").read_text().split()
    assert "the" not in words and {"digit", "seven"} <= set(words)
    scores = load_clip_scorer(tmp_path / "clip").score(torch.rand(2, 3, 32, 32), words)
    assert scores.shape == (2, len(words)) and scores.abs().max() <= 1.0 + 1e-5


def test_train_llm_exports_a_hugging_face_causal_lm_that_learned(ray_local, manifest, text_tokenizer_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code = train_llm.main([f"config.text_tokenizer={text_tokenizer_path}", "config.hidden_size=32",
                           "config.intermediate_size=64", "config.num_hidden_layers=2",
                           f"data.path={manifest}", f"data.text_tokenizer={text_tokenizer_path}",
                           "loop.optim.lr=0.01", *common(tmp_path, "llm", steps=12)])
    assert code == 0
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    assert llm.config.hidden_size == 32 and len(tokenizer) == llm.get_input_embeddings().num_embeddings
    history = [json.loads(line) for line in (tmp_path / "llm" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history


def test_the_x2l_interface_trains_with_the_same_loop(ray_local, manifest, text_tokenizer_path, tiny_llm_path,
                                                     tmp_path):
    code = train_tokenizer.main(["--config", str(CONFIG_DIR / "train" / "x2l_demo.yaml"), f"config.base_llm={tiny_llm_path}",
                                 "config.text_special_ids=[0, 1]", "config.width=32", "config.layers=1",
                                 f"data.path={manifest}", f"data.text_tokenizer={text_tokenizer_path}",
                                 "loop.optim.lr=0.01", *common(tmp_path, "x2l", steps=8)])
    assert code == 0
    x2l = load_pretrained(tmp_path / "x2l")
    assert x2l.soft_tokens(torch.rand(2, 3, 32, 32)).shape == (2, 8 + 2, 32)     # start, 8 queries, end
    assert set(x2l.saved_state()) == {k for k in x2l.state_dict() if k.startswith(("adapter.", "boundaries",
                                                                                  "encoder."))}
    history = [json.loads(line) for line in (tmp_path / "x2l" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"], history


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, text_tokenizer_path) -> Path:
    """What `anytoken prepare` leaves, at toy size: image and audio shards, vocabulary, tokenizers, text tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    from models import AudioVQConfig, AudioVQTokenizer

    root = tmp_path_factory.mktemp("prepared")
    torch.manual_seed(0)
    quantizer = QuantizerConfig(codebook_size=16, code_dim=8)
    ImageVQTokenizer(ImageVQConfig(channels=8, channel_mult=[1, 2], quantizer=quantizer)).save_pretrained(
        root / "tokenizers" / "image")
    AudioVQTokenizer(AudioVQConfig(channels=8, n_mels=16, quantizer=QuantizerConfig(codebook_size=8, code_dim=8))) \
        .save_pretrained(root / "tokenizers" / "audio")
    shutil.copytree(text_tokenizer_path, root / "text_tokenizer")
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"image": 16, "audio": 8})
    vocab.save_pretrained(root)
    tok = AutoTokenizer.from_pretrained(text_tokenizer_path)
    for split, n in (("train", 256), ("val", 16)):
        (root / split).mkdir()
        for modality, width in (("image", 4), ("audio", 2)):
            docs = []
            for i in range(n):
                d = i % 4
                block = vocab.wrap(modality, torch.arange(width * d, width * d + width))
                text = tok(WORDS[d], add_special_tokens=False)["input_ids"]
                docs += media_text_documents(f"{modality}{split}{i}", block, text, ["understanding", "generation"],
                                             bos_id=None, eos_id=1)
            rows = pack_documents(docs, 48, pad_id=1)
            table = pa.Table.from_pylist([{k: getattr(r, k) for k in ("input_ids", "loss_mask", "doc_ids",
                                                                      "position_ids")} for r in rows])
            pq.write_table(table, root / split / f"part-00000-{modality}-0000.parquet")
    return root


def test_train_runs_the_stages_in_order_and_exports_one_model_folder(ray_local, prepared, tiny_llm_path, tmp_path):
    out = tmp_path / "model"
    code = train.main([f"data={prepared}", f"base_llm={tiny_llm_path}", f"--out={out}", "name=teal",
                       f"loop.storage_path={tmp_path / 'ray'}", *LOOP, "loop.micro_batch_size=4",
                       "loop.optim.lr=0.03", "model.sea.weight=0.1", "model.sea.clip=null", "model.lora.rank=2",
                       "model.embedding_init=text_scale",     # the rows initial_audio_rows rebuilds
                       "stages=[{name: image, train: [special, image, lora.image], mix: {image: 1}, steps: 6},"
                       " {name: copy, train: [special], mix: {image: 1}, steps: 2, adapters_from: {audio: image},"
                       "  model: {media_loss_weight: 0.0}},"
                       " {name: joint, train: [all], mix: {image: 1, audio: 1}, steps: 6, lr: 0.01,"
                       "  micro_batch_size: 2}]"])
    assert code == 0
    for name in ("config.json", "model.safetensors", "vocabulary.json", "tokenizers/image/config.json",
                 "tokenizers/audio/config.json", "text_tokenizer/tokenizer.json", "metrics.jsonl", "training.json"):
        assert (out / name).is_file(), name
    training = json.loads((out / "training.json").read_text())
    assert [s["stage"] for s in training["stages"]] == ["image", "copy", "joint"]
    # a stage's own loop settings: the joint stage's learning rate and rows a step, the others the run's
    assert [(s["lr"], s["micro_batch_size"]) for s in training["stages"]] == [(0.03, 4), (0.03, 4), (0.01, 2)]
    assert all(s["frozen_llm_unchanged"] for s in training["stages"])
    stages = tmp_path / "model.stages"
    for stage in ("image", "copy", "joint"):        # every stage's folder is a model evaluate and serve can open
        assert (stages / stage / "text_tokenizer" / "tokenizer.json").is_file()
        assert set(ExportedModel(stages / stage).media_tokenizers()) == {"image", "audio"}
    first, last = load_pretrained(stages / "image"), load_pretrained(out)
    # stage 1 trained the image rows only: the audio rows are still as initialised, and stage 2 moved on from it
    fresh = initial_audio_rows(prepared, tiny_llm_path)
    assert torch.equal(first.embeddings["audio"].weight, fresh)
    assert not torch.equal(first.embeddings["image"].weight, last.embeddings["image"].weight)
    assert not torch.equal(last.embeddings["audio"].weight, fresh)
    # per-modality LoRA: the image stage trained the image adapter alone; the joint stage, whose two workers'
    # batches hold different modalities, trained both
    def adapter(model, name):
        return torch.cat([p.flatten() for n, p in model.llm.named_parameters() if n.endswith(f"lora_b_{name}")])
    assert adapter(first, "image").abs().sum() > 0 and adapter(first, "audio").abs().sum() == 0
    assert adapter(last, "audio").abs().sum() > 0
    # a stage's adapters_from: the copy stage started the audio adapter as the image stage's image adapter
    copied = load_pretrained(stages / "copy")
    assert torch.equal(adapter(copied, "audio"), adapter(first, "image"))
    assert torch.equal(adapter(copied, "image"), adapter(first, "image"))
    # the exported folder reloads to the model that was trained: the same held-out loss as the run measured
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {line["stage"] for line in lines} == {"image", "copy", "joint"}
    # a stage's own model fields: the copy stage weighed media targets at 0, so its loss is the text loss alone
    for line in lines:
        if "lm_loss" in line and "text_loss" in line:
            same = line["lm_loss"] == pytest.approx(line["text_loss"], rel=1e-4)
            assert same == (line["stage"] == "copy"), line
    assert training["stages"][1]["model"] == {"media_loss_weight": 0.0}
    table = pq.read_table(prepared / "val" / "part-00000-image-0000.parquet")
    batch = {k: torch.tensor(table.column(k).to_pylist()) for k in ("input_ids", "loss_mask", "doc_ids",
                                                                     "position_ids")}
    with torch.no_grad():
        again = load_pretrained(out).training_step(batch).metrics["lm_loss"]
        assert last.training_step(batch).metrics["lm_loss"] == pytest.approx(again, abs=1e-6)
        untrained = first.__class__(first.config).training_step(batch).metrics["lm_loss"]
    assert again < untrained
    # init_from: a later run's first stage starts from an exported stage (here training the specials alone)
    more = tmp_path / "more"
    assert train.main([f"data={prepared}", f"base_llm={tiny_llm_path}", f"--out={more}", "name=more",
                       f"init_from={stages / 'image'}", f"loop.storage_path={tmp_path / 'ray'}", *LOOP,
                       "loop.micro_batch_size=4", "model.sea.clip=null", "model.lora.rank=2",
                       "stages=[{name: specials, train: [special], mix: {image: 1}, steps: 2}]"]) == 0
    extended = load_pretrained(more)
    assert torch.equal(extended.embeddings["image"].weight, first.embeddings["image"].weight)
    assert adapter(extended, "image").abs().sum() > 0
    nowhere = tmp_path / "nowhere"
    assert train.main([f"data={prepared}", f"base_llm={tiny_llm_path}", f"--out={nowhere}", f"init_from={nowhere}",
                       "stages=[{name: specials, train: [special], steps: 1}]"]) == 1      # refused before a stage
    assert not nowhere.exists() and not (tmp_path / "nowhere.stages").exists()


def initial_audio_rows(prepared: Path, llm: str) -> torch.Tensor:
    """The audio rows a fresh model starts with (the loop seeds every worker with loop.seed = 0)."""
    from actors.train_jobs import TealConfig, teal_model_config
    from models.pretrained import build_model

    torch.manual_seed(0)
    model = build_model("multimodal_lm", teal_model_config(TealConfig(data=str(prepared), base_llm=llm)))
    return model.embeddings["audio"].weight
