import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fashion_available():
    from lkd_ray.data.fashion import _find_dir

    if _find_dir(None) is None:
        pytest.skip("Fashion-MNIST not installed (./dev installs dataset-fashion-mnist as root); offline data needed")
    return True
