"""Stage 2, augment: a unified dataset -> a new one with LLM enrichment (``enrich``, ``llm_client``,
``llm_prompts``) or BLIP-2 captions (``caption``, ``captioners``). Imports ``data_process.core`` (and ingest)."""
