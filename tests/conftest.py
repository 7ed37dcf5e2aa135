"""Session-wide fixtures: the shipped digits data as real WebDataset shards, written once."""
import pytest


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from nvp_dist.data import open_source, write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards(open_source("digits", None), out, progress=False)
    return out
