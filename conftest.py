"""Root conftest: the pytester plugin for the plugin-level tests."""

pytest_plugins = ["pytester"]
