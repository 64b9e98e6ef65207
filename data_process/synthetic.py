"""A synthetic multimodal entity-linking dataset, small enough to train on in a minute on a laptop CPU.

Entities come in *families* that share one surface name (several different "Varkona"s: a river, a city,
a basketball player, ...). Each entity has a type, a description, attributes and its own procedural PNG:

* the **type** decides the picture's layout (a river is a wavy band, a city a skyline, a person a figure ...);
* the **entity** decides the palette (background, foreground, accent colour), a texture and where things sit;
* every picture gets a little noise.

Mentions are template sentences that use the family's shared name. Some sentences carry a weak textual hint
(the type word or an attribute value), most carry none, so text alone cannot resolve every mention. The mention
image is a noisy variant of the gold entity's picture (shift, scale, colour jitter, noise, occasional flips and a
clutter patch). A few mentions have no image and a few entities have no image, to exercise the masks.

The output is a unified dataset (:func:`data_process.records.save_dataset`), byte-identical for a given seed::

    python -m data_process.synthetic --out data/synthetic --entities 240 --mentions 1800 --seed 0
"""

from __future__ import annotations

import argparse
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_process.io_utils import atomic_write_bytes
from data_process.records import DatasetInfo, Entity, Mention, save_dataset

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Vocabulary: types, attributes and templates. Also the corpus the tiny CLIP tokenizer is trained on.

TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {"occupation": ("painter", "chemist", "poet", "senator", "sprinter", "architect"),
               "nationality": ("Norvian", "Calderan", "Ostrian", "Pellish", "Marenese")},
    "athlete": {"sport": ("basketball", "tennis", "football", "rowing", "cycling"),
                "team": ("Red Harbor", "North Vale", "Iron Bay", "Silver Coast")},
    "river": {"country": ("Norvia", "Caldera", "Ostria", "Pellos", "Marena"),
              "length": ("120 km", "340 km", "610 km", "980 km", "1450 km")},
    "city": {"country": ("Norvia", "Caldera", "Ostria", "Pellos", "Marena"),
             "population": ("40 thousand", "300 thousand", "1 million", "3 million")},
    "country": {"continent": ("Eastmark", "Westmark", "the Southern Isles", "the Northern Reach"),
                "capital": ("Tarsa", "Velmont", "Odrin", "Quessa", "Lumbar")},
    "band": {"genre": ("jazz", "punk", "folk", "metal", "synth pop"),
             "founded": ("1968", "1977", "1989", "1996", "2004")},
    "film": {"director": ("Ada Brenn", "Olek Marr", "Ines Vato", "Tomas Reel"),
             "year": ("1954", "1972", "1988", "2001", "2015")},
    "mountain": {"range": ("Greywall", "Skarn Ridge", "Blue Teeth", "Hollow Peaks"),
                 "height": ("2100 m", "3400 m", "4800 m", "6200 m")},
    "company": {"industry": ("shipping", "software", "mining", "textiles", "banking"),
                "headquarters": ("Tarsa", "Velmont", "Odrin", "Quessa", "Lumbar")},
    "ship": {"class": ("frigate", "liner", "schooner", "icebreaker"),
             "launched": ("1891", "1912", "1937", "1964")},
}

TYPE_NOUNS = {
    "person": "person", "athlete": "athlete", "river": "river", "city": "city", "country": "country",
    "band": "band", "film": "film", "mountain": "mountain", "company": "company", "ship": "ship",
}

DESCRIPTIONS = {
    "person": "{name} is a {nationality} {occupation}.",
    "athlete": "{name} is a professional {sport} player for {team}.",
    "river": "{name} is a river in {country}, about {length} long.",
    "city": "{name} is a city in {country} with {population} inhabitants.",
    "country": "{name} is a country in {continent}; its capital is {capital}.",
    "band": "{name} is a {genre} band founded in {founded}.",
    "film": "{name} is a {year} film directed by {director}.",
    "mountain": "{name} is a mountain of the {range}, {height} high.",
    "company": "{name} is a {industry} company based in {headquarters}.",
    "ship": "{name} is a {class} launched in {launched}.",
}

# Neutral sentences: the name alone, nothing that tells family members apart.
NEUTRAL_TEMPLATES = (
    "{m} was in the news again this week.",
    "Everyone keeps talking about {m}.",
    "A new picture of {m} appeared online today.",
    "We read a long article about {m} yesterday.",
    "Have you ever heard of {m}?",
    "The photo shows {m}.",
    "{m} is mentioned in the report.",
    "My friend sent me this image of {m}.",
    "Here is {m} again.",
    "This is the famous {m}.",
    "Nobody expected {m} to appear here.",
    "Another look at {m} from last year.",
)

# Weakly informative sentences: a type word or an attribute value appears.
HINT_TEMPLATES = (
    "The {t} {m} was in the news again.",
    "A picture of {m}, the well known {t}.",
    "{m} has something to do with {a}.",
    "People linked {m} with {a} this week.",
)

EXTRA_WORDS = (
    "a an the of in on at to for with from by and or but is was are were be been has have had it its this that "
    "these those who what which where when why how photo picture image shows new old famous known well long short "
    "big small city river mountain film band person country company ship athlete player team founded directed "
    "launched high km m million thousand year news article report online today yesterday week friend about "
    "talking everyone nobody expected appear look last again here ever heard read sent me my we you they he she"
)

NAME_SYLLABLES = ("var", "ko", "na", "tel", "ri", "mos", "an", "dor", "lu", "ven", "sa", "quin", "ba", "rel",
                  "to", "mir", "ca", "zan", "ol", "pe", "thu", "gri", "fa", "lem", "ys", "do", "ra", "ber")


def vocabulary_corpus() -> list[str]:
    """Sentences covering the generator's vocabulary (used to train the tiny CLIP tokenizer)."""
    lines = [EXTRA_WORDS]
    for typ, attrs in TYPES.items():
        lines.append(typ)
        for key, values in attrs.items():
            lines.append(key + " " + " ".join(values))
        lines.append(DESCRIPTIONS[typ])
    lines.extend(NEUTRAL_TEMPLATES)
    lines.extend(HINT_TEMPLATES)
    lines.append(" ".join(NAME_SYLLABLES))
    return lines


# ---------------------------------------------------------------------------------------------
# Pictures

PALETTE = np.array([
    (230, 57, 70), (29, 53, 87), (69, 123, 157), (241, 250, 238), (42, 157, 143), (233, 196, 106),
    (244, 162, 97), (38, 70, 83), (131, 56, 236), (255, 190, 11), (58, 134, 255), (6, 214, 160),
    (17, 17, 17), (200, 200, 200), (141, 153, 174), (120, 60, 20),
], dtype=np.int64)

TEXTURES = ("plain", "hstripes", "vstripes", "dots", "checks")


@dataclass(frozen=True)
class Look:
    """Visual identity of one entity: palette indices, texture and layout jitter."""

    bg: int
    fg: int
    accent: int
    texture: int
    params: tuple[float, ...]  # 6 numbers in [0, 1) that place the type's elements


def _colour(i: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in PALETTE[i])


def _texture(draw: ImageDraw.ImageDraw, size: int, kind: str, colour, period: int) -> None:
    if kind == "hstripes":
        for y in range(0, size, period):
            draw.rectangle([0, y, size, y + period // 3], fill=colour)
    elif kind == "vstripes":
        for x in range(0, size, period):
            draw.rectangle([x, 0, x + period // 3, size], fill=colour)
    elif kind == "dots":
        r = max(1, period // 4)
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif kind == "checks":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2 == 0:
                    draw.rectangle([x, y, x + period // 2, y + period // 2], fill=colour)


def render_entity(typ: str, look: Look, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw an entity picture: layout from ``typ``, palette/texture/placement from ``look``."""
    s = size
    img = Image.new("RGB", (s, s), _colour(look.bg))
    d = ImageDraw.Draw(img)
    _texture(d, s, TEXTURES[look.texture], _colour(look.accent), period=max(4, s // 6))
    fg, ac = _colour(look.fg), _colour(look.accent)
    p = look.params
    u = s / 64.0  # layout is designed on a 64-pixel canvas

    def px(v: float) -> int:
        return int(round(v * u))

    if typ in ("person", "athlete"):
        cx = px(20 + 24 * p[0])
        d.ellipse([cx - px(9), px(8), cx + px(9), px(26)], fill=fg)
        d.rectangle([cx - px(12), px(28), cx + px(12), px(60)], fill=fg)
        if typ == "athlete":
            d.ellipse([cx + px(10), px(44), cx + px(22), px(56)], fill=ac)
    elif typ == "river":
        y0 = 20 + 24 * p[0]
        amp, freq = 4 + 6 * p[1], 1 + 2 * p[2]
        for x in range(s):
            y = y0 + amp * np.sin(2 * np.pi * freq * x / s + 6.28 * p[3])
            d.rectangle([x, px(y - 6), x, px(y + 6)], fill=fg)
    elif typ == "city":
        n = 4 + int(4 * p[0])
        w = s / n
        for i in range(n):
            h = 16 + 40 * ((p[1] * 7.3 + i * 0.37 + p[2]) % 1.0)
            d.rectangle([int(i * w), px(64 - h), int((i + 1) * w) - 2, s], fill=fg)
    elif typ == "country":
        cx, cy = 32 + 10 * (p[0] - 0.5), 32 + 10 * (p[1] - 0.5)
        pts = []
        for k in range(9):
            ang = 2 * np.pi * k / 9
            r = 14 + 12 * ((p[2] * 5.1 + k * p[3] * 1.7) % 1.0)
            pts.append((px(cx + r * np.cos(ang)), px(cy + r * np.sin(ang))))
        d.polygon(pts, fill=fg)
        d.ellipse([px(cx - 3), px(cy - 3), px(cx + 3), px(cy + 3)], fill=ac)
    elif typ == "band":
        for i in range(3):
            cx = px(12 + 20 * i + 4 * (p[i] - 0.5))
            d.ellipse([cx - px(5), px(22), cx + px(5), px(32)], fill=fg)
            d.rectangle([cx - px(6), px(34), cx + px(6), px(58)], fill=fg)
    elif typ == "film":
        d.rectangle([0, px(10), s, px(54)], fill=fg)
        for x in range(2, 64, 8):
            d.rectangle([px(x), px(13), px(x + 4), px(17)], fill=ac)
            d.rectangle([px(x), px(47), px(x + 4), px(51)], fill=ac)
        d.rectangle([px(10 + 10 * p[0]), px(22), px(40 + 12 * p[1]), px(42)], fill=ac)
    elif typ == "mountain":
        peak = 8 + 40 * p[0]
        d.polygon([(0, s), (px(peak + 8), px(12 + 10 * p[1])), (s, s)], fill=fg)
        d.polygon([(px(peak), px(18 + 10 * p[1])), (px(peak + 8), px(12 + 10 * p[1])),
                   (px(peak + 16), px(18 + 10 * p[1]))], fill=ac)
    elif typ == "company":
        c = 32 + 8 * (p[0] - 0.5)
        r = 16 + 6 * p[1]
        d.polygon([(px(c), px(c - r)), (px(c + r), px(c)), (px(c), px(c + r)), (px(c - r), px(c))], fill=fg)
        d.rectangle([px(c - 5), px(c - 5), px(c + 5), px(c + 5)], fill=ac)
    elif typ == "ship":
        y = 38 + 10 * p[0]
        d.polygon([(px(6), px(y)), (px(58), px(y)), (px(50), px(y + 12)), (px(14), px(y + 12))], fill=fg)
        d.rectangle([px(28 + 6 * p[1]), px(y - 22), px(31 + 6 * p[1]), px(y)], fill=ac)
        d.polygon([(px(32 + 6 * p[1]), px(y - 22)), (px(48), px(y - 6)), (px(32 + 6 * p[1]), px(y - 6))], fill=fg)
    else:
        raise ValueError(f"unknown entity type {typ!r}")
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, 4.0, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def perturb(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A noisy view of ``img``: scale/shift, colour jitter, pixel noise, a clutter patch, sometimes a flip."""
    s = img.size[0]
    scale = rng.uniform(0.85, 1.15)
    dx, dy = rng.uniform(-0.1, 0.1, size=2) * s
    # PIL affine maps output -> input coordinates.
    a = 1.0 / scale
    cx = cy = s / 2
    coeffs = (a, 0.0, cx - a * cx - dx, 0.0, a, cy - a * cy - dy)
    fill = tuple(int(c) for c in np.asarray(img)[0, 0])
    out = img.transform((s, s), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if rng.random() < 0.2:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(out, dtype=np.float32)
    arr = arr * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15, size=3)
    # clutter: a small rectangle of a random colour somewhere
    w = int(rng.integers(s // 8, s // 4))
    x0, y0 = (int(v) for v in rng.integers(0, s - w, size=2))
    arr[y0:y0 + w, x0:x0 + w] = PALETTE[int(rng.integers(len(PALETTE)))]
    arr = arr + rng.normal(0.0, 10.0, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class SyntheticConfig:
    entities: int = 240
    mentions: int = 1800
    seed: int = 0
    image_size: int = 64
    min_family: int = 2
    max_family: int = 5
    hint_rate: float = 0.3  # fraction of mention sentences with a weak textual hint
    mention_no_image_rate: float = 0.06
    entity_no_image_rate: float = 0.03
    n_candidates: int = 10


def _family_names(n: int, rng: np.random.Generator) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = int(rng.integers(2, 4))
        name = "".join(NAME_SYLLABLES[int(i)] for i in rng.integers(len(NAME_SYLLABLES), size=k)).capitalize()
        if name not in seen and len(name) >= 4:
            seen.add(name)
            names.append(name)
    return names


def _family_sizes(total: int, cfg: SyntheticConfig, rng: np.random.Generator) -> list[int]:
    sizes: list[int] = []
    left = total
    while left > 0:
        k = int(rng.integers(cfg.min_family, cfg.max_family + 1))
        if left - k < cfg.min_family:
            k = left if left <= cfg.max_family else left - cfg.min_family
        sizes.append(k)
        left -= k
    return sizes


def generate(out: str | Path, cfg: SyntheticConfig = SyntheticConfig(), progress: bool = True) -> Path:
    """Write the synthetic dataset to ``out`` (see module docstring); returns ``out``."""
    if cfg.entities < cfg.min_family:
        raise ValueError(f"--entities must be at least {cfg.min_family}, got {cfg.entities}")
    if cfg.mentions < 1:
        raise ValueError(f"--mentions must be positive, got {cfg.mentions}")
    if cfg.image_size < 16:
        raise ValueError(f"--image_size must be at least 16, got {cfg.image_size}")
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    sizes = _family_sizes(cfg.entities, cfg, rng)
    names = _family_names(len(sizes), rng)
    type_names = list(TYPES)

    entities: list[Entity] = []
    types: dict[str, str] = {}
    looks: dict[str, Look] = {}
    families: list[list[str]] = []
    for fam, (name, k) in enumerate(zip(names, sizes)):
        # members of a family mostly have different types; one repeat type in larger families keeps it hard
        fam_types = [type_names[int(i)] for i in rng.choice(len(type_names), size=k, replace=False)]
        if k >= 4 and rng.random() < 0.5:
            fam_types[-1] = fam_types[0]
        members = []
        for typ in fam_types:
            eid = f"E{len(entities):05d}"
            attrs = {key: str(vals[int(rng.integers(len(vals)))]) for key, vals in TYPES[typ].items()}
            attrs["type"] = typ
            desc = DESCRIPTIONS[typ].format(name=name, **attrs)
            bg, fg, ac = (int(i) for i in rng.choice(len(PALETTE), size=3, replace=False))
            looks[eid] = Look(bg=bg, fg=fg, accent=ac, texture=int(rng.integers(len(TEXTURES))),
                              params=tuple(float(v) for v in rng.random(6)))
            has_image = rng.random() >= cfg.entity_no_image_rate
            images = (f"images/entities/{eid}.png",) if has_image else ()
            entities.append(Entity(id=eid, name=name, description=desc, attributes=attrs, images=images))
            types[eid] = typ
            members.append(eid)
        families.append(members)

    by_id = {e.id: e for e in entities}
    family_of = {eid: fi for fi, members in enumerate(families) for eid in members}
    all_ids = [e.id for e in entities]

    entity_pictures: dict[str, Image.Image] = {}
    for e in tqdm(entities, desc="entity images", disable=not progress):
        pic = render_entity(types[e.id], looks[e.id], cfg.image_size, rng)
        entity_pictures[e.id] = pic
        if e.images:
            atomic_write_bytes(out / e.images[0], png_bytes(pic))

    mentions: list[Mention] = []
    for i in tqdm(range(cfg.mentions), desc="mentions", disable=not progress):
        gold = all_ids[int(rng.integers(len(all_ids)))]
        ent = by_id[gold]
        if rng.random() < cfg.hint_rate:
            tpl = HINT_TEMPLATES[int(rng.integers(len(HINT_TEMPLATES)))]
            attr_keys = sorted(k for k in ent.attributes if k != "type")
            hint_attr = ent.attributes[attr_keys[int(rng.integers(len(attr_keys)))]]
            sentence = tpl.format(m=ent.name, t=TYPE_NOUNS[types[gold]], a=hint_attr)
        else:
            sentence = NEUTRAL_TEMPLATES[int(rng.integers(len(NEUTRAL_TEMPLATES)))].format(m=ent.name)
        start = sentence.index(ent.name)
        u = rng.random()
        split = "train" if u < 0.7 else ("dev" if u < 0.8 else "test")
        mid = f"M{i:05d}"
        image = None
        if rng.random() >= cfg.mention_no_image_rate:
            image = f"images/mentions/{mid}.png"
            atomic_write_bytes(out / image, png_bytes(perturb(entity_pictures[gold], rng)))
        fam = list(families[family_of[gold]])
        others = [x for x in all_ids if family_of[x] != family_of[gold]]
        n_extra = max(0, min(cfg.n_candidates - len(fam), len(others)))
        extra = [others[int(j)] for j in rng.choice(len(others), size=n_extra, replace=False)] if n_extra else []
        cands = fam + extra
        order = rng.permutation(len(cands))
        mentions.append(Mention(id=mid, sentence=sentence, mention=ent.name, gold_id=gold, split=split,
                                span=(start, start + len(ent.name)), image=image,
                                candidates=tuple(cands[int(j)] for j in order)))

    info = DatasetInfo(
        name="synthetic",
        source_format="synthetic",
        split_rule="each mention assigned train/dev/test with probabilities 0.7/0.1/0.2 from the seeded generator",
        notes={"seed": cfg.seed, "entities": cfg.entities, "mentions": cfg.mentions, "image_size": cfg.image_size,
               "families": len(families), "hint_rate": cfg.hint_rate,
               "entities_without_image": sum(1 for e in entities if not e.images),
               "mentions_without_image": sum(1 for m in mentions if m.image is None),
               "generator": "data_process.synthetic"},
    )
    save_dataset(out, info, entities, mentions)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_process.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    ap.add_argument("--entities", type=int, default=SyntheticConfig.entities)
    ap.add_argument("--mentions", type=int, default=SyntheticConfig.mentions)
    ap.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    ap.add_argument("--image_size", type=int, default=SyntheticConfig.image_size)
    ap.add_argument("--no_progress", action="store_true", help="hide progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = SyntheticConfig(entities=args.entities, mentions=args.mentions, seed=args.seed,
                          image_size=args.image_size)
    try:
        out = generate(args.out, cfg, progress=not args.no_progress)
    except ValueError as exc:
        ap.error(str(exc))
    print(f"wrote {cfg.entities} entities and {cfg.mentions} mentions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
