"""Adapters that put forkattn's kernels inside other libraries' models.

Each adapter is its own submodule and is imported explicitly (its library stays optional):
    import forkattn.integrations.transformers   # attn_implementation="forkattn"
"""
