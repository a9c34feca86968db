"""Benchmarks: Streamgate against a direct relay, on the same demo LLM and the same clients.

``python -m bench --help`` lists the options; docs/benchmarks.md holds the latest results.
"""
