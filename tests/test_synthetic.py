"""The synthetic demo dataset: determinism, structure, and that images (not text) resolve family members."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_process.core.records import load_dataset
from data_process.fixtures.synthetic import TYPES, SyntheticConfig, generate, main


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "data"
    generate(out, SyntheticConfig(entities=40, mentions=200, seed=3, image_size=32), progress=False)
    return out


def test_deterministic_bytes_for_a_seed(small, tmp_path):
    again = generate(tmp_path / "again", SyntheticConfig(entities=40, mentions=200, seed=3, image_size=32),
                     progress=False)
    assert _digest(small) == _digest(again)
    other = generate(tmp_path / "other", SyntheticConfig(entities=40, mentions=200, seed=4, image_size=32),
                     progress=False)
    assert _digest(small) != _digest(other)


def test_structure_families_splits_and_masks(small):
    ds = load_dataset(small)  # validates every record, spans and gold ids
    assert len(ds.entities) == 40 and len(ds.mentions) == 200
    fams = defaultdict(list)
    for e in ds.entities:
        fams[e.name].append(e)
        assert e.attributes["type"] in TYPES
        assert e.description.startswith(e.name)
    assert all(len(members) >= 2 for members in fams.values())
    assert len(fams) < len(ds.entities) / 2 + 1
    by_id = {e.id: e for e in ds.entities}
    for m in ds.mentions:
        assert m.mention == by_id[m.gold_id].name
        assert m.sentence[m.span[0]:m.span[1]] == m.mention
        assert m.gold_id in m.candidates
        # every member of the gold family is a candidate
        assert {e.id for e in fams[m.mention]} <= set(m.candidates)
    splits = Counter(m.split for m in ds.mentions)
    assert set(splits) == {"train", "dev", "test"}
    assert 0.55 < splits["train"] / 200 < 0.85
    assert any(m.image is None for m in ds.mentions)
    assert all((small / m.image).is_file() for m in ds.mentions if m.image)
    assert all((small / e.images[0]).is_file() for e in ds.entities if e.images)
    assert ds.info.source_format == "synthetic" and ds.info.notes["seed"] == 3


def test_entity_without_image_exists_at_default_rate(tmp_path):
    generate(tmp_path / "d", SyntheticConfig(entities=200, mentions=5, seed=0, image_size=16), progress=False)
    ds = load_dataset(tmp_path / "d")
    assert any(not e.images for e in ds.entities)
    assert ds.info.notes["entities_without_image"] == sum(1 for e in ds.entities if not e.images)


def test_text_is_ambiguous_and_images_differ(small):
    ds = load_dataset(small)
    by_id = {e.id: e for e in ds.entities}
    hint_words = set()
    for e in ds.entities:
        hint_words.update(v.lower() for k, v in e.attributes.items())
    no_hint = [m for m in ds.mentions if not any(w in m.sentence.lower() for w in hint_words)]
    assert len(no_hint) > 0.5 * len(ds.mentions)  # most sentences carry no type word nor attribute
    # the same sentence is used for different members of one family
    gold_by_sentence = defaultdict(set)
    for m in ds.mentions:
        gold_by_sentence[m.sentence].add(m.gold_id)
    assert any(len(g) > 1 for g in gold_by_sentence.values())
    # family members look different; a mention image is close to its gold entity picture
    fams = defaultdict(list)
    for e in ds.entities:
        if e.images:
            fams[e.name].append(np.asarray(Image.open(small / e.images[0]), dtype=np.float32))
    for pics in fams.values():
        for i in range(len(pics)):
            for j in range(i + 1, len(pics)):
                assert np.abs(pics[i] - pics[j]).mean() > 10
    m = next(m for m in ds.mentions if m.image and by_id[m.gold_id].images)
    pic = np.asarray(Image.open(small / m.image))
    assert pic.shape == (32, 32, 3)


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--entities", "1", "--no-progress"])
    assert "--entities must be at least 2, got 1" in capsys.readouterr().err


def test_image_features_resolve_family_members_text_does_not(tmp_path):
    """Design check: with a tiny *random* CLIP, mention image -> entity image nearest neighbour within the
    gold family is far better than chance, while text-only nearest neighbour is not."""
    from data_process.encode.encoders import load_encoders
    from data_process.fixtures.tiny_models.clip import save_tiny_clip

    data = generate(tmp_path / "d", SyntheticConfig(entities=80, mentions=240, seed=0, image_size=64),
                    progress=False)
    clip = save_tiny_clip(tmp_path / "clip", seed=0, image_size=64)
    text_enc, image_enc = load_encoders(str(clip), device="cpu", max_len=32)
    ds = load_dataset(data)
    ents = [e for e in ds.entities if e.images]
    row = {e.id: i for i, e in enumerate(ents)}
    fams = defaultdict(list)
    for e in ents:
        fams[e.name].append(e.id)
    ms = [m for m in ds.mentions if m.image and m.gold_id in row and len(fams[m.mention]) > 1]
    e_img, _ = image_enc.encode_images([Image.open(data / e.images[0]) for e in ents])
    m_img, _ = image_enc.encode_images([Image.open(data / m.image) for m in ms])
    e_txt = text_enc.encode([e.text() for e in ents]).pooled
    m_txt = text_enc.encode([m.sentence for m in ms]).pooled

    def accuracy(q: np.ndarray, kb: np.ndarray) -> float:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        kb = kb / np.linalg.norm(kb, axis=1, keepdims=True)
        hits = 0
        for k, m in enumerate(ms):
            cands = fams[m.mention]
            best = cands[int(np.argmax(kb[[row[c] for c in cands]] @ q[k]))]
            hits += best == m.gold_id
        return hits / len(ms)

    chance = float(np.mean([1 / len(fams[m.mention]) for m in ms]))
    img_acc, txt_acc = accuracy(m_img, e_img), accuracy(m_txt, e_txt)
    assert len(ms) > 150
    assert img_acc > chance + 0.4 and img_acc > 0.8, (img_acc, chance)
    assert txt_acc < chance + 0.2, (txt_acc, chance)


def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--entities", "6", "--mentions", "5", "--image_size", "16",
                 "--seed", "2", "--no-progress"]) == 0
    assert "wrote 6 entities and 5 mentions" in capsys.readouterr().out
    ds = load_dataset(tmp_path / "d")
    assert len(ds.entities) == 6 and len(ds.mentions) == 5
    pic = next(e for e in ds.entities if e.images)
    assert Image.open(tmp_path / "d" / pic.images[0]).size == (16, 16)
