"""Draft-model training for speculative decoding (`specmesh train draft`); README.md beside this.

Modules, in the order a run uses them: `recipe` (every knob of a run), `device` (device and
precision), `slicing` (the draft as a slice of the target), `sources` (chat prompts and corpus
chunks: packs, caller, or `data`, this machine's files; `pack` is the portable file),
`tmodel` (a plain-torch Llama for batched training and batched generation, HF parameter
names), `labels` (the target's answers and top-k labels), `vocab` (the truncated draft
vocabulary), `calibration` (the final-norm rescale), `loss`, `distill` (the training loop),
`evaluation`, `progress` (time budget and bar), `checkpoint` (the output directory) and
`train` (`train_draft`, which runs all of them).

The draft's R2R token router (`specmesh train router`): `router_texts` (the texts, split by
prompt and document), `rollout` (the target's greedy continuations from many branch points
of a text at once), `router_labels` (match / neutral / divergent, and the served draft's
router inputs), `router_export` (router.onnx / .safetensors / .json) and `router`
(`train_router`, which runs them); services/draft/router.py loads the result.
"""
