"""`specmesh train image`: VQ tokenizer, class-conditional AR model, its draft, and the judge."""
