import os

os.environ.setdefault("KILN_NO_PROGRESS", "1")

pytest_plugins = ["kiln.testing.pytest_plugin"]
