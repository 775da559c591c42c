import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py too, so that ``python -m pytest bench`` finds the microbenchmarks
    (a file named on the command line is collected by pytest itself)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
