"""data/loader.py: the contract every loader keeps, and one rule for size, batch and threads."""

import os

import torch
from conftest import HAS_DALI

from collab_fast.data import DaliLoader, DataConfig, DeviceLoader, SyntheticLoader, build_loaders, scan_split


def test_one_rule_for_image_size_batch_size_and_loader_threads():
    import inspect

    from collab_fast.data import DaliLoader, TorchFolderLoader
    from collab_fast.data.loader import default_threads

    # the loaders and build_loaders take the size and the batch from the caller: no default of their own
    for fn, name in [(DaliLoader, "image_size"), (TorchFolderLoader, "image_size"), (SyntheticLoader, "image_size"),
                     (build_loaders, "batch_size")]:
        assert inspect.signature(fn).parameters[name].default is inspect.Parameter.empty, (fn, name)
    # loader parallelism: one name (threads) and one default wherever it is taken
    for fn in (DaliLoader, TorchFolderLoader, scan_split):
        params = inspect.signature(fn).parameters
        assert "threads" in params and params["threads"].default is None and not {"num_threads", "num_workers"} & set(params)
    assert default_threads() == max(1, min(8, os.cpu_count() or 1))
    assert "min(8, CPU cores)" in DataConfig.__dataclass_fields__["threads"].metadata["help"]


def test_every_loader_keeps_the_loader_protocol(toy):
    from collab_fast.data import Loader, TorchFolderLoader

    files, labels, _ = scan_split(toy, "train")
    loaders = [TorchFolderLoader(files, labels, 4, train=True, num_classes=3, image_size=24, threads=0),
               DeviceLoader(torch.zeros(8, 4, 4, 3, dtype=torch.uint8), torch.arange(8) % 2, 4, mean=(0.5,) * 3,
                            std=(0.5,) * 3),
               SyntheticLoader(2, image_size=8, num_classes=3, steps_per_epoch=2)]
    if HAS_DALI:  # the DALI extra; without it the other loaders are still held to the contract
        loaders.append(DaliLoader(files, labels, 4, train=True, num_classes=3, image_size=24))
    for loader in loaders:  # the contract the trainer relies on, loader by loader
        name = type(loader).__name__
        assert isinstance(loader, Loader), name
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == len(loader) > 1, name
        for x, y in batches:
            assert x.is_floating_point() and x.dim() == 4 and x.shape[1] == 3, name
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],) and x.device == y.device, name
        loader.set_epoch(0)
        tail = list(loader.iter_from(1))  # resuming mid-epoch: the epoch's batches from the second on
        assert len(tail) == len(loader) - 1, name
        if not isinstance(loader, DaliLoader):  # (DALI's reader reshuffles itself after each pass)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, batches[1:])), name
        state = loader.state_dict()
        assert isinstance(state, dict), name
        loader.load_state_dict(state)
    if not HAS_DALI:
        return
    # DALI: the reader's state and the batches of the epoch it stands after (plain values for a checkpoint)
    dali = loaders[-1]
    it = iter(dali)
    next(it)
    state = dali.state_dict()
    assert set(state) == {"reader", "batch_in_epoch"} and state["batch_in_epoch"] == 1
