"""VQ image tokenizer (LlamaGen VQModel layout) and its trainer."""
