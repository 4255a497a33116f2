"""Base models: GPT-2 (lorafit's own, from any weight source), lorafit's Llama decoder, any transformers model."""
