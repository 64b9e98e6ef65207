"""Captioning throughput: BLIP-2 OPT-2.7B architecture (random weights) and image decoding.

Measures, and writes as JSON + Markdown:

* ``model``: ``generate`` throughput (images/s) per dtype and batch size, on already preprocessed
  pixels with a fixed-length prompt (32 image placeholders + ``--prompt-tokens`` text tokens) and
  exactly ``--max-new-tokens`` new tokens (``min_new_tokens`` = max, so random weights cannot stop early);
  speed does not depend on weight values. Weights are created on the device, in the target dtype.
* ``decode``: decode-only rate of synthetic JPEGs through the pipeline's DataLoader
  (:func:`data_process.core.images.iter_decoded`) with N worker processes, and the main-process
  image-processor (resize/normalise) rate.
* ``end_to_end``: :func:`data_process.augment.caption.caption_dataset` on a synthetic dataset of those JPEGs
  (hashing, decode workers, processor, generate, fsync'ed cache, output folder), first batch size/dtype.

GPU (the real sizes)::

    .venv/bin/python bench/bench_caption.py --out bench/results/caption_bench_gpu

CPU proof at reduced scale::

    .venv/bin/python bench/bench_caption.py --small --out bench/results/caption_bench_cpu
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_process.augment.caption import CaptionConfig, caption_dataset
from data_process.core.images import iter_decoded
from data_process.augment.captioners import Blip2Captioner, GenerationSettings, resize_exact
from data_process.core.devices import resolve_device
from data_process.core.durable_io import atomic_write_json, atomic_write_text
from data_process.core.records import DatasetInfo, Entity, Mention, save_dataset
from data_process.fixtures.tiny_models.blip2 import build_tiny_tokenizer
from nel_model.runs import cpu_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def blip2_config(small: bool, image_token_index: int):
    """Blip2Config of Salesforce/blip2-opt-2.7b (ViT-g/14, 32-query Q-Former, OPT-2.7B), or a reduced one."""
    from transformers import Blip2Config

    if small:  # same structure and image size, few narrow layers: proves the code path on CPU
        vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      image_size=224, patch_size=14)
        qformer = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       cross_attention_frequency=2)
        text = dict(model_type="opt", hidden_size=256, word_embed_proj_dim=256, ffn_dim=1024, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=50272, max_position_embeddings=2048)
    else:
        vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                      image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
        qformer = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       cross_attention_frequency=2, vocab_size=30522)
        text = dict(model_type="opt", hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240, num_hidden_layers=32,
                    num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048)
    text.update(bos_token_id=2, eos_token_id=50118, pad_token_id=1)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                       image_token_index=image_token_index)


def build_model(config, device: str, dtype):
    from transformers import Blip2ForConditionalGeneration

    t0 = time.perf_counter()
    with torch.device(device):
        model = Blip2ForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, time.perf_counter() - t0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_generate(model, config, device: str, dtype, batch_size: int, prompt_tokens: int, max_new_tokens: int,
                   repeats: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=g).to(device, dtype)
    text = torch.randint(3, 50000, (batch_size, prompt_tokens - 1), generator=g)
    ids = torch.cat([torch.full((batch_size, config.num_query_tokens), config.image_token_index),
                     torch.full((batch_size, 1), 2), text], dim=1).to(device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kw)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kw)
        sync(device)
        dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + max_new_tokens, out.shape
    res = {"batch_size": batch_size, "images_per_s": batch_size * repeats / dt, "s_per_batch": dt / repeats}
    if device.startswith("cuda"):
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def synthetic_jpegs(folder: Path, n: int, width: int, height: int, seed: int) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + noise, quality 90), each different."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.002, 0.02, 3)
        base = np.stack([127 + 100 * np.sin(a * xx + i), 127 + 100 * np.cos(b * yy), 127 + 100 * np.sin(c * (xx + yy))], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        p = folder / f"img{i:05d}.jpg"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def bench_decode(paths: list[Path], workers: list[int], batch_size: int, image_size: int | None = None) -> list[dict]:
    """Decode-only images/s per worker count; with ``image_size``, workers also do the processor's resize
    (what the pipeline does for BLIP-2), so less crosses the process boundary."""
    from PIL import Image as PILImage

    prepare = None
    if image_size:
        prepare = functools.partial(resize_exact, width=image_size, height=image_size,
                                    resample=int(PILImage.Resampling.BICUBIC))
    out = []
    for w in workers:
        t0 = time.perf_counter()
        n = 0
        for batch in iter_decoded(paths, batch_size, w, prepare):
            n += sum(1 for _, img, _ in batch if img is not None)
        dt = time.perf_counter() - t0
        assert n == len(paths)
        out.append({"workers": w, "images_per_s": n / dt, "resize_in_worker": image_size})
    return out


def bench_preprocess(paths: list[Path], image_size: int, batch_size: int) -> float:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    proc = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    images = [Image.open(p).convert("RGB") for p in paths]
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        proc(images[i:i + batch_size], return_tensors="pt")
    return len(images) / (time.perf_counter() - t0)


def bench_end_to_end(model, config, paths: list[Path], work: Path, batch_size: int, workers: int,
                     max_new_tokens: int) -> dict:
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    size = config.vision_config.image_size
    proc = Blip2Processor(BlipImageProcessorPil(size={"height": size, "width": size}), build_tiny_tokenizer(),
                          num_query_tokens=config.num_query_tokens)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    data = work / "e2e_data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    for p in paths:
        target = data / "images" / p.name
        if not target.exists():
            os.link(p, target)
    ments = [Mention(f"m{i}", f"A photo of Entity {i}.", f"Entity {i}", "E1", "test", image=f"images/{p.name}")
             for i, p in enumerate(paths)]
    save_dataset(data, DatasetInfo("bench", "synthetic"), [Entity("E1", "Entity")], ments)
    # Byte-level tokenizer: prompts are longer than with OPT's BPE (~60 vs ~16 tokens); min_new_tokens is not set,
    # random weights decide when to stop, so this number is a pipeline check, not the headline.
    captioner = Blip2Captioner.from_objects(model, proc, name="random-blip2",
                                            settings=GenerationSettings(1, max_new_tokens))
    cfg = CaptionConfig(batch_size=batch_size, num_workers=workers, cache=str(work / "e2e_cache.jsonl"))
    t0 = time.perf_counter()
    stats = caption_dataset(data, work / "e2e_out", captioner, cfg, progress=False)
    dt = time.perf_counter() - t0
    return {"images": len(paths), "batch_size": batch_size, "workers": workers, "wall_s": dt,
            "images_per_s": len(paths) / dt, "model_s": stats.model_seconds, "captioned": stats.captioned,
            "model_only_images_per_s": len(paths) / stats.model_seconds if stats.model_seconds else None,
            "pipeline_efficiency": stats.model_seconds / dt,
            "prompt_tokens_bytelevel": len(proc.tokenizer("Question: who or what in this image is Entity 1? Answer:")
                                           ["input_ids"])}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU: {cpu_model()} ({os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()})"


def to_markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"# Captioning benchmark ({'reduced --small architecture' if a['small'] else 'BLIP-2 OPT-2.7B architecture'})",
             "", f"- device: {res['device_name']}", f"- torch {res['torch']}, transformers {res['transformers']}",
             f"- parameters: {res['parameters'] / 1e6:.1f} M (random weights)",
             f"- prompt: 32 image tokens + {a['prompt_tokens']} text tokens; exactly {a['max_new_tokens']} new tokens, greedy",
             f"- command: `{res['command']}`", "", "## Model (generate)", "",
             "| dtype | batch | images/s | s/batch | peak GiB |", "|---|---|---|---|---|"]
    for r in res["model"]:
        peak = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "–"
        lines.append(f"| {r['dtype']} | {r['batch_size']} | {r['images_per_s']:.2f} | {r['s_per_batch']:.3f} | {peak} |")
    d = res["decode"]
    lines += ["", f"## Image decoding ({d['images']} synthetic {d['size']} JPEGs, {d['mean_kb']:.0f} KB mean)", "",
              f"| decode workers | images/s (full-size images to main process) | images/s (worker also resizes to "
              f"{d['image_size']}px, as the pipeline does) |", "|---|---|---|"]
    lines += [f"| {r['workers']} | {r['images_per_s']:.1f} | {q['images_per_s']:.1f} |"
              for r, q in zip(d["rates"], d.get("rates_resize_in_worker", d["rates"]))]
    lines += ["", f"Main-process image processor (resize to {d['image_size']}px + normalise): "
                  f"{d['preprocess_images_per_s']:.1f} images/s.", "",
              "Share of serial per-image time (decode in 1 process + preprocess + generate) spent decoding and "
              "preprocessing; decoding runs in worker processes, so it is hidden when the workers' rate exceeds "
              "the generate rate:", "",
              "| dtype | batch | decode share | preprocess share | generate images/s ≤ decode rate with max workers? |",
              "|---|---|---|---|---|"]
    best = max(r["images_per_s"] for r in d.get("rates_resize_in_worker", d["rates"]))
    for r in res["model"]:
        t_dec, t_pre, t_gen = 1 / min(d["rates"], key=lambda x: x["workers"])["images_per_s"], 1 / d["preprocess_images_per_s"], 1 / r["images_per_s"]
        tot = t_dec + t_pre + t_gen
        lines.append(f"| {r['dtype']} | {r['batch_size']} | {100 * t_dec / tot:.1f}% | {100 * t_pre / tot:.1f}% | "
                     f"{'yes' if r['images_per_s'] <= best else 'no: decoding is the bottleneck'} |")
    if res.get("end_to_end"):
        e = res["end_to_end"]
        lines += ["", "## End to end (`caption_dataset`)", "",
                  f"{e['images']} images, batch {e['batch_size']}, {e['workers']} workers, {res['model'][0]['dtype']}: "
                  f"{e['images_per_s']:.2f} images/s ({e['wall_s']:.1f} s wall, {e['model_s']:.1f} s in the model: the "
                  f"pipeline runs at {100 * e['pipeline_efficiency']:.0f}% of the model-only rate of the same "
                  f"captions, {e['model_only_images_per_s']:.2f} images/s). "
                  f"Byte-level prompt of {e['prompt_tokens_bytelevel']} tokens, stop at EOS or "
                  f"{a['max_new_tokens']} tokens."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import sys
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="reduced architecture (CPU proof), not OPT-2.7B sizes")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", default=None, help="comma list of fp16,bf16,fp32 (default fp16,bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per setting (after 1 warm-up)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="text tokens in the prompt (OPT BPE of the default "
                                                                 "prompt with a short mention is ~16)")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--decode-images", type=int, default=256)
    p.add_argument("--decode-workers", default="0,1,2,4,8")
    p.add_argument("--jpeg-size", default="640x480")
    p.add_argument("--e2e-images", type=int, default=64, help="images for the end-to-end run; 0 skips it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    a = p.parse_args(argv)

    device = str(resolve_device(a.device))
    dtypes = (a.dtypes or ("fp16,bf16" if device.startswith("cuda") else "fp32")).split(",")
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    workers = [int(x) for x in a.decode_workers.split(",")]
    width, height = (int(x) for x in a.jpeg_size.split("x"))
    torch.manual_seed(a.seed)

    config = blip2_config(a.small, image_token_index=build_tiny_tokenizer().vocab_size)  # "<image>" id of the
    # byte-level tokenizer, so the end-to-end run can use a real processor
    results: dict = {"args": vars(a), "device": device, "device_name": device_name(device),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "command": "python bench/bench_caption.py " + " ".join(sys.argv[1:] if argv is None else argv),
                     "model": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(Path(tmp) / "jpegs", a.decode_images, width, height, a.seed)
        rates = bench_decode(paths, workers, batch_size=32)
        rates_resized = bench_decode(paths, workers, 32, image_size=config.vision_config.image_size)
        pre = bench_preprocess(paths[:64], config.vision_config.image_size, 32)
        results["decode"] = {"images": len(paths), "size": a.jpeg_size, "rates": rates,
                             "rates_resize_in_worker": rates_resized, "image_size":
                             config.vision_config.image_size, "preprocess_images_per_s": pre,
                             "mean_kb": float(np.mean([q.stat().st_size for q in paths]) / 1024)}
        print(f"decode: {rates}; with resize in worker: {rates_resized}; preprocess {pre:.1f} img/s", flush=True)
        dec1 = next((r["images_per_s"] for r in rates if r["workers"] == 0), rates[0]["images_per_s"])
        for name in dtypes:
            model, build_s = build_model(config, device, DTYPES[name])
            results["parameters"] = sum(t.numel() for t in model.parameters())
            for bs in batch_sizes:
                r = bench_generate(model, config, device, DTYPES[name], bs, a.prompt_tokens, a.max_new_tokens,
                                   a.repeats, a.seed)
                t_dec, t_gen = 1 / dec1, 1 / r["images_per_s"]
                r.update(dtype=name, build_s=build_s, decode_share_serial=t_dec / (t_dec + t_gen))
                results["model"].append(r)
                print(json.dumps(r), flush=True)
            if name == dtypes[0] and a.e2e_images > 0:
                e2e = paths if a.e2e_images <= len(paths) else synthetic_jpegs(
                    Path(tmp) / "e2e_jpegs", a.e2e_images, width, height, a.seed + 1)
                n = a.e2e_images
                results["end_to_end"] = bench_end_to_end(model, config, e2e[:n], Path(tmp), batch_sizes[-1],
                                                         max(workers), a.max_new_tokens)
                print(json.dumps(results["end_to_end"]), flush=True)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    out = Path(a.out)
    atomic_write_json(out.with_suffix(".json"), results)
    atomic_write_text(out.with_suffix(".md"), to_markdown(results))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
