"""Shared fixtures: the shipped digits data as real WebDataset shards (written once per session), and one
intra-op thread for files of tiny models."""
import pytest
import torch


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from nvp_dist.data import open_source, write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards(open_source("digits", None), out, progress=False)
    return out


@pytest.fixture
def one_thread():
    """Tiny tensors: on a busy 2-core machine a second intra-op thread only adds contention (it made
    test_figures.py 6x slower; 0.05 s against 2-6 s per step in test_invertible.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
