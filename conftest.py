"""Root conftest: nothing project-wide yet; test layers have their own conftest files."""
