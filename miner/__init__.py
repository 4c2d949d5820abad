"""The miner: trains one pipeline stage on work items the orchestrator routes to it."""
