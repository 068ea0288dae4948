"""The public API: `Gateway.Generate` / `GenerateStream` / `ListModels`, routing every token
between a draft service and a target service (policies `target`, `draft`, `speculative`).

Kept free of torch: see gateway.server for the entry point.
"""
