"""Image AR service: VQ tokenizer + class-conditional AR over the token grid, decoded plainly or
speculatively (exact, LANTERN, GSD), streamed as PNG previews. Training recipe in training/."""
