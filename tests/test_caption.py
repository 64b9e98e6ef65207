"""Captioning: tiny BLIP-2 round trip, batching, cache/resume, bad images, caption import, CLI."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from data_process.augment.caption import (CaptionConfig, caption_dataset, combine_texts, import_captions, load_config_file,
                                  main, read_caption_file)
from data_process.augment.captioners import Blip2Captioner, Captioner, GenerationSettings
from data_process.core.entry import run_main
from data_process.core.records import DataError, DatasetInfo, Entity, Mention, load_dataset, save_dataset
from data_process.core.settings import ConfigError
from data_process.fixtures.tiny_models.blip2 import save_tiny_blip2

PROMPT = "Question: who or what in this image is {mention}? Answer:"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return save_tiny_blip2(tmp_path_factory.mktemp("tiny_blip2"), seed=0)


@pytest.fixture(scope="module")
def captioner(tiny_path) -> Blip2Captioner:
    return Blip2Captioner(str(tiny_path), device="cpu", dtype="auto", settings=GenerationSettings(1, 8))


class CountingCaptioner:
    """Wraps a captioner and counts model calls and images."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.images = 0
        self.model_name = inner.model_name

    @property
    def id(self) -> str:
        return self.inner.id

    def caption(self, images, prompts):
        self.calls += 1
        self.images += len(images)
        return self.inner.caption(images, prompts)


def _jpeg(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 4):  # some structure, so JPEG has several blocks
        img.putpixel((x, x % size[1]), (255 - color[0], 0, 255))
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _images(n):
    return [Image.new("RGB", (20 + 7 * i, 30), ((53 * i) % 256, (97 * i + 40) % 256, (11 * i + 200) % 256))
            for i in range(n)]


def make_dataset(root: Path) -> Path:
    """m1: a.jpg, m2: b.jpg, m3: a.jpg again (other mention), m4: no image, m5: bad.jpg, m6: gone.jpg,
    m7: truncated.jpg."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    (img_dir / "a.jpg").write_bytes(_jpeg((200, 30, 30)))
    (img_dir / "b.jpg").write_bytes(_jpeg((30, 30, 200)))
    (img_dir / "bad.jpg").write_bytes(b"this is not an image")
    (img_dir / "truncated.jpg").write_bytes(_jpeg((10, 200, 10), size=(64, 64))[:300])
    ents = [Entity("E1", "Alice Smith", "a person", images=("images/b.jpg",)), Entity("E2", "Bob")]

    def m(i, mention, image, gold="E1"):
        sentence = f"Here {mention} is."
        return Mention(f"m{i}", sentence, mention, gold, "train", span=(5, 5 + len(mention)), image=image)

    ments = [m(1, "Alice", "images/a.jpg"), m(2, "Bob", "images/b.jpg", "E2"), m(3, "Alice Smith", "images/a.jpg"),
             m(4, "Bob", None, "E2"), m(5, "Alice", "images/bad.jpg"), m(6, "Bob", "images/gone.jpg", "E2"),
             m(7, "Bob", "images/truncated.jpg", "E2")]
    save_dataset(root, DatasetInfo("toy", "unit-test"), ents, ments)
    return root


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_blip2_round_trip(tiny_path, captioner):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_path)
    proc = AutoProcessor.from_pretrained(tiny_path)
    assert model.config.image_token_index == proc.tokenizer.convert_tokens_to_ids("<image>")
    assert proc.num_query_tokens == model.config.num_query_tokens == 4
    inputs = proc(images=_images(1), text=["Question: who? Answer:"], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 4  # placeholders go in

    assert isinstance(captioner, Captioner)
    prompts = [PROMPT.replace("{mention}", "Alice"), ""]
    texts = captioner.caption(_images(2), prompts)
    assert len(texts) == 2
    for text in texts:
        assert isinstance(text, str) and text
        assert "<image>" not in text and "Question" not in text and "<pad>" not in text and "</s>" not in text
    assert captioner.id == f"blip2:{tiny_path}:beams=1:max_new_tokens=8"


def test_batching_matches_one_by_one(captioner):
    images = _images(5)
    prompts = [PROMPT.replace("{mention}", m) for m in ("Al", "Alexander the Great of Macedon", "Bo", "", "X Y")]
    batched = captioner.caption(images, prompts)
    single = [captioner.caption([im], [p])[0] for im, p in zip(images, prompts)]
    assert batched == single
    assert len(set(batched)) > 1  # the captions actually depend on the inputs


def test_combine_texts():
    assert combine_texts(["a man on a stage", "Barack Obama"]) == "a man on a stage. Barack Obama"
    assert combine_texts(["a dog.", "Rex"]) == "a dog. Rex"
    assert combine_texts(["", "Rex"]) == "Rex"
    assert combine_texts([]) == ""


def test_caption_dataset_resume_and_bad_images(tmp_path, captioner):
    data = make_dataset(tmp_path / "data")
    counting = CountingCaptioner(captioner)
    cfg = CaptionConfig(model="tiny", prompt=PROMPT, plain_caption=True, batch_size=2, num_workers=1,
                        cache=str(tmp_path / "cache.jsonl"))
    stats = caption_dataset(data, tmp_path / "out", counting, cfg, progress=False)
    # images a, b are decoded; a has two mentions (two prompts) + plain caption -> 3 jobs; b: 2 jobs
    assert counting.images == 5 and counting.calls == 3
    assert (stats.mentions, stats.with_image, stats.no_image, stats.captioned, stats.failed) == (7, 6, 1, 3, 3)
    assert (stats.jobs, stats.jobs_run, stats.jobs_failed, stats.jobs_from_cache) == (9, 5, 4, 0)

    ds = load_dataset(tmp_path / "out")
    by_id = {m.id: m for m in ds.mentions}
    cap = by_id["m1"].caption
    assert set(cap) == {"text", "answer", "plain", "provenance"}
    assert cap["text"] == combine_texts([cap["answer"], cap["plain"]])
    prov = cap["provenance"]
    assert prov["model"] == str(captioner.model_name) and prov["captioner"] == captioner.id
    assert prov["prompt"] == PROMPT and prov["prompt_rendered"] == PROMPT.replace("{mention}", "Alice")
    assert prov["plain_caption"] is True and len(prov["image_sha256"]) == 64 and prov["created"]
    assert by_id["m3"].caption["plain"] == cap["plain"]  # same image, same plain caption
    assert by_id["m3"].caption["provenance"]["prompt_rendered"] == PROMPT.replace("{mention}", "Alice Smith")
    for mid in ("m4", "m5", "m6", "m7"):
        assert by_id[mid].caption is None
    # images resolve through the symlinked images/ folder; paths unchanged
    assert (tmp_path / "out" / "images").is_symlink()
    assert by_id["m1"].image == "images/a.jpg" and ds.image_path(by_id["m1"].image).is_file()
    assert ds.image_path(ds.entities[0].images[0]).is_file()
    assert ds.info.notes["captions"]["captioner"] == captioner.id

    report = json.loads((tmp_path / "out" / "caption_report.json").read_text())
    assert (report["captioned"], report["failed"], report["no_image"]) == (3, 3, 1)
    reasons = {f["mention_id"]: f["reason"] for f in report["failures"]}
    assert set(reasons) == {"m5", "m6", "m7"}
    assert reasons["m5"].startswith("unreadable: UnidentifiedImageError")
    assert reasons["m6"] == "missing: file not found"
    assert reasons["m7"] == "unreadable: OSError: Truncated File Read"

    # Re-run: everything comes from the cache, the model is not called, captions are identical.
    again = CountingCaptioner(captioner)
    stats2 = caption_dataset(data, tmp_path / "out", again, cfg, progress=False)
    assert again.calls == 0 and stats2.jobs_from_cache == 9 and stats2.jobs_run == 0
    assert [m.caption for m in load_dataset(tmp_path / "out").mentions] == [m.caption for m in ds.mentions]

    # Resume after adding a mention with a new image: only that image goes to the model.
    (data / "images" / "c.jpg").write_bytes(_jpeg((120, 120, 0)))
    src = load_dataset(data)
    new = Mention("m8", "Here Carol is.", "Carol", "E1", "dev", span=(5, 10), image="images/c.jpg")
    save_dataset(data, src.info, src.entities, src.mentions + [new])
    third = CountingCaptioner(captioner)
    stats3 = caption_dataset(data, tmp_path / "out", third, replace(cfg, num_workers=0), progress=False)
    assert third.images == 2 and stats3.jobs_from_cache == 9 and stats3.captioned == 4

    # --retry-failed tries the corrupt images again (and the missing one is still only reported).
    fourth = CountingCaptioner(captioner)
    stats4 = caption_dataset(data, tmp_path / "out", fourth, replace(cfg, num_workers=0, retry_failed=True),
                             progress=False)
    assert fourth.calls == 0 and stats4.jobs_failed == 4 and stats4.failed == 3


def test_rewrite_image_paths(tmp_path, captioner):
    data = make_dataset(tmp_path / "data")
    cfg = CaptionConfig(prompt=PROMPT, batch_size=4, num_workers=0, images="rewrite")
    caption_dataset(data, tmp_path / "out", captioner, cfg, progress=False)
    assert not (tmp_path / "out" / "images").exists()
    assert (tmp_path / "out" / "caption_cache.jsonl").is_file()
    ds = load_dataset(tmp_path / "out")
    m1 = next(m for m in ds.mentions if m.id == "m1")
    assert m1.image == "../data/images/a.jpg" and ds.image_path(m1.image).is_file()
    assert set(m1.caption) == {"text", "answer", "provenance"}


def test_out_must_differ_from_data(tmp_path, captioner):
    data = make_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="is the --data folder"):
        caption_dataset(data, data, captioner, CaptionConfig(num_workers=0), progress=False)


# ---------------------------------------------------------------------------------------------
# Import


def test_import_json_and_jsonl(tmp_path):
    data = make_dataset(tmp_path / "data")
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"m2": "Bob on a bike", "a.jpg": "a red square", "images/bad.jpg": "??"}))
    report = import_captions(data, caps, tmp_path / "out", source_model="Salesforce/blip2-opt-2.7b")
    assert (report["captioned"], report["by_id"], report["by_image"], report["without_caption"]) == (4, 1, 3, 3)
    ds = load_dataset(tmp_path / "out")
    by_id = {m.id: m for m in ds.mentions}
    assert by_id["m1"].caption["text"] == by_id["m3"].caption["text"] == "a red square"
    assert by_id["m2"].caption["text"] == "Bob on a bike"
    prov = by_id["m2"].caption["provenance"]
    assert prov["model"] == "Salesforce/blip2-opt-2.7b" and prov["record"] == "key 'm2'" and prov["prompt"] is None
    assert by_id["m4"].caption is None

    lines = tmp_path / "caps.jsonl"
    lines.write_text('{"id": "m1", "caption": "Alice"}\n\n{"image": "b.jpg", "text": "blue"}\n')
    import_captions(data, lines, tmp_path / "out2", images="rewrite")
    by_id = {m.id: m for m in load_dataset(tmp_path / "out2").mentions}
    assert by_id["m1"].caption["text"] == "Alice" and by_id["m2"].caption["text"] == "blue"
    assert by_id["m1"].caption["provenance"]["record"] == "line 1"
    assert by_id["m3"].caption is None


@pytest.mark.parametrize("name,content,message", [
    ("c.jsonl", '{"id": "m1", "caption": "ok"}\n{"id": "m2", "caption": 7}\n',
     "line 2, field 'caption': must be a string, got int"),
    ("c.jsonl", '{"id": "m1", "caption": "ok"}\n{"id": "zzz", "caption": "x"}\n',
     "line 2, field 'id': unknown mention id 'zzz'"),
    ("c.jsonl", '{"image": "a.jpg", "text": "x"}\n{"image": "a.jpg", "text": "y"}\n',
     "line 2, field 'image': duplicate image 'a.jpg', first seen on line 1"),
    ("c.jsonl", '{"id": "m1", "caption": "x", "score": 1}\n',
     "line 1, field 'score': is not a field of a caption record (id|image, caption|text)"),
    ("c.jsonl", '{"id": "m1"}\n', "line 1, field 'caption': record must have exactly one of 'caption' or 'text'"),
    ("c.jsonl", '{"caption": "x"}\n', "line 1, field 'id': record must have exactly one of 'id' or 'image'"),
    ("c.jsonl", '{"id": "m1", "caption": "x"\n', "line 1: invalid JSON (Expecting ',' delimiter at column 28)"),
    ("c.json", '{"m1": "x", "m1": "y"}', "key 'm1', field 'id': duplicate key"),
    ("c.json", '{"m1": ["x"]}', "key 'm1', field 'caption': must be a string, got list"),
    ("c.json", '{"nope.png": "x"}', "key 'nope.png', field 'id': unknown mention id or image file name 'nope.png'"),
    ("c.json", '["x"]', "file: must be a JSON object {id or image file name: caption}, got list"),
])
def test_import_bad_records(tmp_path, name, content, message):
    data = make_dataset(tmp_path / "data")
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        import_captions(data, path, tmp_path / "out")
    assert str(err.value) == f"{path}, {message}"
    assert not (tmp_path / "out").exists()


def test_read_caption_file_rejects_other_suffix(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("x")
    with pytest.raises(DataError, match=r"c.txt, file: captions file must end in .json"):
        read_caption_file(p)


# ---------------------------------------------------------------------------------------------
# CLI / config


def test_cli_run_and_import(tmp_path, tiny_path, capsys):
    data = make_dataset(tmp_path / "data")
    cfg_file = tmp_path / "caption.yaml"
    cfg_file.write_text(f"model: {tiny_path}\nmax_new_tokens: 5\nnum_workers: 0\ndevice: cpu\n")
    rc = main(["--config", str(cfg_file), "--data", str(data), "--out", str(tmp_path / "out"), "--batch-size", "3",
               "--prompt", "Who is {mention}?", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"mentions": 7, "captioned": 3, "failed": 3, "no_image": 1, "jobs_run": 3,
                       "jobs_from_cache": 0, "jobs_failed": 2}
    report = json.loads((tmp_path / "out" / "caption_report.json").read_text())
    assert report["captioner"] == f"blip2:{tiny_path}:beams=1:max_new_tokens=5" and report["dtype"] == "torch.float32"
    assert report["prompt"] == "Who is {mention}?" and report["device"] == "cpu"

    caps = tmp_path / "caps.json"
    caps.write_text('{"m1": 3}')
    with pytest.raises(SystemExit) as exit_:
        run_main(main, ["import", "--data", str(data), "--captions", str(caps), "--out", str(tmp_path / "o2")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == (f"error: {caps}, key 'm1', field 'caption': must be a string, "
                                                       "got int")


def test_config_file_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("modle: x\n")
    with pytest.raises(ConfigError, match=r"c.yaml: modle: unknown key; did you mean 'model'"):
        load_config_file(p)
    with pytest.raises(ValueError, match="nothing to do"):
        CaptionConfig(prompt="", plain_caption=False)


def test_worker_resize_keeps_pixels_identical(captioner):
    prepare = captioner.prepare_image
    assert prepare is not None
    img = _images(4)[3].resize((300, 170))
    proc = captioner.processor.image_processor
    direct = proc([img], return_tensors="pt")["pixel_values"]
    early = proc([prepare(img)], return_tensors="pt")["pixel_values"]
    assert prepare(img).size == (32, 32)
    assert bool((direct == early).all())
