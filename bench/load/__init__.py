"""`specmesh bench load`: concurrent streaming requests through the gateway (see benchmark.py)."""
