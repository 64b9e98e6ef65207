"""Tiny, randomly initialised models built in code (no model hub needed) for demos and tests.

Each builder saves with ``save_pretrained`` so the folder loads exactly like a Hugging Face model name:
``data_process.tiny_models.clip.save_tiny_clip`` writes a CLIP model + tokenizer + image processor.
"""
