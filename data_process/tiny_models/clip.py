"""A tiny CLIP (random weights) with a real byte-level BPE tokenizer, built offline.

``save_tiny_clip(out_dir)`` writes a folder that loads with ``CLIPModel.from_pretrained(path)``,
``AutoTokenizer.from_pretrained(path)`` and ``CLIPImageProcessor.from_pretrained(path)``, so every step
that takes a CLIP name (``openai/clip-vit-base-patch32``) also takes this path.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]  # eos id 3 (not 2: see CLIPTextModel)
MAX_POSITIONS = 77


def build_tokenizer(corpus: list[str], vocab_size: int = 1200):
    """Train a byte-level BPE tokenizer on ``corpus`` (deterministic) and wrap it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_POSITIONS)


def tiny_clip_config(vocab_size: int, image_size: int = 64, patch_size: int = 8, hidden: int = 64,
                     layers: int = 2, heads: int = 4, projection_dim: int = 64):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=MAX_POSITIONS, pad_token_id=0, bos_token_id=2,
                eos_token_id=3, projection_dim=projection_dim)
    vision = dict(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                  projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip(out_dir: Path, seed: int = 0, image_size: int = 64) -> Path:
    """Build a tiny random CLIP + tokenizer + image processor and save it to ``out_dir``; returns ``out_dir``.

    Deterministic for a seed: the same seed gives the same weights and tokenizer.
    """
    import torch
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from data_process.synthetic import vocabulary_corpus

    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of the patch size 8, got {image_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocabulary_corpus())
    config = tiny_clip_config(vocab_size=len(tokenizer), image_size=image_size)
    saved_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    finally:
        torch.random.set_rng_state(saved_state)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    processor.save_pretrained(out_dir)
    return out_dir
