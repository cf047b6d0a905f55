"""Fixtures shared by the pytester runs of ``tests/plugin``: ``inner`` and
``gondolin_cache`` are the root conftest's (one definition for every test folder)."""
