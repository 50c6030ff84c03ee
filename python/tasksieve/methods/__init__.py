"""The methods, on tensors: the WindowKV / SnapKV / PyramidKV presses, FlexPrefill, and PreMoe's patterns and
keep sets. They import torch and :mod:`tasksieve.ops` only: never transformers, never an integration."""
