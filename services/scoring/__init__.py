"""ScoringService: machine-text detection, membership inference and uncertainty over the target
model (the Binoculars performer) and, optionally, an observer model sharing its tokenizer."""
