"""Draft-model training for speculative decoding (`specmesh train draft`).

Modules: `tmodel` (a plain-torch Llama for batched training and batched generation, HF
parameter names), `data` (real offline text: corpus and chat prompts), `labels` (target
labelling: generated chat answers, top-k logits), `draft` (the recipe, slicing, saving,
evaluation and the training loop).
"""
