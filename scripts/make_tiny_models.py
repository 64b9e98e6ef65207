"""Build the tiny random models used by the demo and the tests (no model hub needed).

    python scripts/make_tiny_models.py --out tiny_models [--blip2] [--seed 0] [--image_size 64]

writes ``OUT/clip`` (CLIP model + BPE tokenizer + image processor) and, with ``--blip2``, ``OUT/blip2``.
Each folder loads with ``from_pretrained(path)`` exactly like a Hugging Face model name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def main(argv: list[str] | None = None) -> int:
    from data_process.tiny_models.clip import save_tiny_clip

    ap = argparse.ArgumentParser(description="Build tiny random CLIP (and BLIP-2) models for demos and tests.")
    ap.add_argument("--out", required=True, type=Path, help="folder to write clip/ (and blip2/) into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image_size", type=int, default=64, help="CLIP input resolution (multiple of 8)")
    ap.add_argument("--blip2", action="store_true", help="also build a tiny BLIP-2 captioner in OUT/blip2")
    args = ap.parse_args(argv)
    clip = save_tiny_clip(args.out / "clip", seed=args.seed, image_size=args.image_size)
    print(f"tiny CLIP: {clip}")
    if args.blip2:
        from data_process.tiny_models.blip2 import save_tiny_blip2

        blip2 = save_tiny_blip2(args.out / "blip2", seed=args.seed)
        print(f"tiny BLIP-2: {blip2}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
