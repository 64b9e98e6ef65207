"""A tiny, randomly initialised BLIP-2 (vision encoder + Q-Former + OPT) with a working processor.

Built entirely offline (no model hub): a byte-level BPE tokenizer (every byte is a token, no merges)
and a PIL image processor. ``save_tiny_blip2(dir)`` writes it with ``save_pretrained`` so that
``Blip2ForConditionalGeneration.from_pretrained(dir)`` and ``Blip2Processor.from_pretrained(dir)``
(or ``AutoProcessor``) load it by path, exactly like a real checkpoint. Used by tests and ``--small``
benchmarks; its captions are gibberish but deterministic.
"""

from __future__ import annotations

from pathlib import Path

# OPT-style special tokens, in OPT's id order.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4
INIT_STD = 0.3  # large enough that a random model's greedy output varies with the image


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tiny_tokenizer():
    """An OPT-like byte-level tokenizer (GPT2Tokenizer) with 4 special tokens + 256 byte tokens."""
    from transformers import GPT2Tokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    tok = GPT2Tokenizer(
        vocab=vocab,
        merges=[],
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        padding_side="left",
    )
    return tok


def build_tiny_blip2(seed: int = 0):
    """Return ``(model, processor)``: a tiny random Blip2ForConditionalGeneration and its Blip2Processor."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = build_tiny_tokenizer()
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = ((len(tokenizer) + 15) // 16) * 16

    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            cross_attention_frequency=1, vocab_size=64, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=vocab_size, hidden_size=32, word_embed_proj_dim=32,
                         ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, init_std=INIT_STD),
        num_query_tokens=NUM_QUERY_TOKENS,
        initializer_range=INIT_STD,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Keep a random model from choosing special tokens (tied embeddings = output head): zero logits
        # for them so greedy decoding produces visible text instead of stopping at once.
        # Same for bytes outside printable ASCII, so captions are readable.
        emb = model.get_input_embeddings().weight
        byte_to_char = _bytes_to_unicode()
        printable = {tokenizer.convert_tokens_to_ids(byte_to_char[b]) for b in range(ord(" "), ord("~") + 1)}
        for token_id in range(emb.shape[0]):
            if token_id not in printable:
                emb[token_id] = 0.0
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return model, processor


def save_tiny_blip2(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny BLIP-2 checkpoint (model + processor) to ``out_dir``; return ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_blip2(seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
