"""Data: WebDataset shards from the paper's data sets, and the loader that streams them to ranks."""
