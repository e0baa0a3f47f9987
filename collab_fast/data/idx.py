"""MNIST-format data sets (MNIST, Fashion-MNIST): the four IDX files, gzipped or not, read and checked.

The IDX format (LeCun et al.'s MNIST page): two zero bytes, a type byte (0x08: unsigned bytes), the number
of dimensions, each dimension as a big-endian uint32, then the values in row-major order. Images are
[N, 28, 28] (idx3), labels [N] (idx1). Every file is checked (magic, sizes against the bytes present,
image and label counts, the label range) and a bad one is refused in one line naming it.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["IDX_SETS", "default_idx_dir", "find_idx_files", "load_idx_set", "read_idx", "write_idx"]

# data set -> (classes, the folder its Debian package installs, how to get the files)
IDX_SETS = {
    "fashion-mnist": (10, "/usr/share/datasets/fashion-mnist",
                      "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or the four *-ubyte.gz files of "
                      "github.com/zalandoresearch/fashion-mnist"),
    "mnist": (10, None, "the four *-ubyte.gz files of the MNIST database (yann.lecun.com/exdb/mnist or a mirror)"),
}
_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
           "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# torchvision.datasets keeps the same files in ROOT/<Name>/raw/
_TORCHVISION_DIRS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_MAX_VALUES = 1 << 31  # 2 GiB of bytes: far above any MNIST-format set, far below what would exhaust memory


def default_idx_dir(dataset: str) -> Path | None:
    """The folder the data set's system package installs, if it is there."""
    folder = IDX_SETS[dataset][1]
    return Path(folder) if folder and Path(folder).is_dir() else None


def _candidate(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_files(dataset: str, root: str | Path | None) -> dict[str, tuple[Path, Path]]:
    """{"train": (images, labels), "test": (images, labels)} in root (or root/raw, root/<Name>/raw as
    torchvision lays them out); root None: the system package's folder. Missing files: one line saying
    where they were looked for and how to get them."""
    how = IDX_SETS[dataset][2]
    if root is None:
        found = default_idx_dir(dataset)
        if found is None:
            raise FileNotFoundError(f"{dataset}: no --data DIR given and no system copy found; get the files with "
                                    f"{how}, then pass --data DIR")
        root = found
    root = Path(root)
    folders = [root, root / "raw", root / _TORCHVISION_DIRS[dataset] / "raw"]
    for folder in folders:
        files = {split: tuple(_candidate(folder, stem) for stem in stems) for split, stems in _SPLITS.items()}
        if all(p is not None for pair in files.values() for p in pair):
            return files  # type: ignore[return-value]
    first = _SPLITS["train"][0]
    raise FileNotFoundError(f"--data {root}: the {dataset} IDX files (e.g. {first} or {first}.gz) are not there "
                            f"(nor in raw/ or {_TORCHVISION_DIRS[dataset]}/raw/); get them with {how}")


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array of `ndim` dimensions from `path` (gzipped or not), checked."""
    path = Path(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
                raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {head.hex() or 'missing'}, expected "
                                 f"0000080{ndim})")
            if head[3] != ndim:
                raise ValueError(f"{path} holds a {head[3]}-dimensional array where {ndim} dimensions belong "
                                 f"({'images' if ndim == 3 else 'labels'}); are the image and label files swapped?")
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise ValueError(f"{path} is truncated (its header ends early); fetch the file again")
            shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))
            count = int(np.prod(shape, dtype=np.int64))
            if 0 in shape or count > _MAX_VALUES:
                raise ValueError(f"{path} declares an array of shape {shape}: not a data set this reader takes")
            data = f.read(count + 1)  # one byte more than declared: trailing bytes mean a damaged file
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}); fetch the file again") from None
    if len(data) != count:
        what = "is truncated" if len(data) < count else "has bytes beyond the array its header declares"
        raise ValueError(f"{path} {what} (header: {shape}); fetch the file again")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray, gz: bool = False) -> None:
    """Writes a uint8 array as an IDX file (tests, and converting other sources into this format)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes() + a.tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(payload)


def load_idx_set(dataset: str, root: str | Path | None):
    """((train images uint8 [N, H, W, 1], labels int64 [N]), (test images, labels)) of an MNIST-format set."""
    classes = IDX_SETS[dataset][0]
    out = []
    for img_path, lab_path in find_idx_files(dataset, root).values():  # train, then test
        x, y = read_idx(img_path, 3), read_idx(lab_path, 1)
        if len(x) != len(y):
            raise ValueError(f"{img_path} holds {len(x)} images but {lab_path} {len(y)} labels; the files do not "
                             "belong together")
        if int(y.max()) >= classes:
            raise ValueError(f"{lab_path} holds label {int(y.max())}; {dataset} has classes 0..{classes - 1}")
        out.append((torch.from_numpy(x.copy()).unsqueeze(-1), torch.from_numpy(y.astype(np.int64))))
    return out[0], out[1]
