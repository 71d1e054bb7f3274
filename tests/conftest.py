"""Suite-wide test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: the test tensors are tiny, and extra threads only wait on a busy machine.

    Subprocesses started by tests (the CLI, Slurm jobs) keep torch's default.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
