"""``scripts/run``: Streamgate on one machine (a private Redis, the demo LLM, a gateway and
workers) with one command."""
