"""Integrations: where tasksieve meets a serving stack. Each one adapts the methods of :mod:`tasksieve.methods` to a
framework's model objects; methods never import them.

hf    HuggingFace transformers: attention and cache patching, the MoE block swap, PreMoe on HF models.
"""
