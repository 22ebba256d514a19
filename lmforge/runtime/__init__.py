"""Engines: one per backend, behind the same prefill/decode interface."""
