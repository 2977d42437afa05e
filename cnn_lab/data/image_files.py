"""A user's own images, as a folder of class folders or a NumPy .npz file: found, checked, split.

Nothing here writes: `open_source` lists and inspects the files (headers only) and raises
ValueError naming what is wrong and how to fix it; `read_image` decodes one file (Pillow).
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

SPLITS = ("train", "val", "test")
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF")  # MPO: multi-picture JPEG from cameras.
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_MAX_LISTED = 5  # Bad files named in an error.


@dataclasses.dataclass(frozen=True)
class Source:
    """Examples of a folder or .npz file, with their labels and what their headers say.

    `files[split]`: paths (folder) or row indices into `arrays[split]` (npz); `labels[split]`
    (n,) int. A split absent from the source (e.g. no DIR/val) is an empty list here and is
    carved from train by the caller. `sizes`: the distinct (width, height) found; `colour`:
    whether any image has colour (else all are grey).
    """

    path: Path
    class_names: tuple[str, ...]
    files: dict[str, list]
    labels: dict[str, np.ndarray]
    sizes: frozenset[tuple[int, int]]
    colour: bool
    fingerprint: str  # Changes when a file is added, removed, renamed, resized or touched.
    arrays: dict[str, np.ndarray] | None = None  # npz only: the images of each split.
    scan: dict | None = None  # Folder only: what the headers said (see _scan).


def open_source(
    path: str | Path, *, skip_bad_files: bool = False, scan_dir: Path | None = None
) -> Source:
    """The images at `path`: DIR/<class>/*, DIR/{train,val,test}/<class>/*, or FILE.npz.

    A folder's files are listed and their headers read, unless `scan_dir` keeps a scan
    (`keep_scan`) of files with the same names, sizes and modification times.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(
            f"config.data.source_dir={str(path)!r} does not exist. Pass a folder of class "
            "folders (DIR/<class>/*.png), a folder with train/ (and val/, test/) holding class "
            "folders, or a .npz file with x_train and y_train."
        )
    if path.is_file():
        return _open_npz(path)
    return _open_folder(path, skip_bad_files, scan_dir)


def _visible(folder: Path) -> list[Path]:
    """Entries of `folder` in sorted order, without hidden ones (.DS_Store, our .cnn_lab cache)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _open_folder(root: Path, skip_bad_files: bool, scan_dir: Path | None) -> Source:
    folders = [p for p in _visible(root) if p.is_dir()]
    if not folders:
        raise ValueError(
            f"config.data.source_dir={str(root)!r} holds no class folders. Put each class's "
            f"images in a folder named after it: {root}/<class>/<image>.png."
        )
    split_layout = "train" in {p.name for p in folders} and {p.name for p in folders} <= set(SPLITS)
    split_roots = {s: root / s for s in SPLITS if (root / s).is_dir()} if split_layout else {}
    class_root = split_roots.get("train", root)
    class_names = tuple(p.name for p in _visible(class_root) if p.is_dir())
    if len(class_names) < 2:
        raise ValueError(
            f"{class_root} holds {len(class_names)} class folder(s) {list(class_names)}; "
            "classification needs at least 2. Put each class's images in its own folder: "
            f"{class_root}/<class>/<image>.png."
        )
    listed = []  # (split, class folder, file) of every visible file, in a fixed order.
    for split in SPLITS:
        base = split_roots.get(split) if split_layout else (root if split == "train" else None)
        for folder in (p for p in _visible(base) if p.is_dir()) if base else ():
            if folder.name not in class_names:
                raise ValueError(
                    f"{folder} is a class that {class_root} does not have (its classes: "
                    f"{list(class_names)}). Rename it, or add {class_root / folder.name}."
                )
            found = sorted(p for p in folder.rglob("*") if p.is_file() and _shown(p, folder))
            listed += [(split, folder, file) for file in found]
            if not found and split == "train":
                raise ValueError(f"Class folder {folder} is empty. Add images, or remove it.")
    stats = ((f.relative_to(root), f.stat()) for *_, f in listed)
    stats = (f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}" for name, stat in stats)
    fingerprint = hashlib.sha256("\n".join([str(root.resolve()), *stats]).encode()).hexdigest()
    scan = _read_scan(scan_dir, fingerprint) or _scan([f for *_, f in listed], root)
    bad = {root / b for b in scan["bad"]}
    files = {split: [] for split in SPLITS}
    labels = {split: [] for split in SPLITS}
    for split, folder, file in listed:
        if file not in bad:
            files[split].append(file)
            labels[split].append(class_names.index(folder.name))
    present = set(labels["train"])
    for label in (c for c in range(len(class_names)) if c not in present):
        raise ValueError(
            f"Class folder {class_root / class_names[label]} holds no images, only other "
            "files. Add JPEG, PNG, BMP or GIF images to it, or remove the folder."
        )
    if bad and not skip_bad_files:
        shown = ", ".join(str(root / b) for b in scan["bad"][:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise ValueError(
            f"{len(bad)} file(s) in {root} are not JPEG, PNG, BMP or GIF images: {shown}{more}. "
            "Remove them, or pass --config.data.skip_bad_files=True to train without them."
        )
    sizes = frozenset(tuple(size) for size in scan["sizes"])
    labels = {split: np.asarray(values, np.int64) for split, values in labels.items()}
    return Source(root, class_names, files, labels, sizes, scan["colour"], fingerprint, scan=scan)


def _scan(files: list[Path], root: Path) -> dict:
    """What the headers of `files` say: {"bad": relative paths, "sizes": [[w, h]], "colour": bool}."""
    bad, sizes, colour = [], set(), False
    for file in files:
        header = _header(file)
        if header is None:
            bad.append(str(file.relative_to(root)))
            continue
        mode, size, grey_palette = header
        sizes.add(size)
        colour |= mode not in _GREY_MODES and not grey_palette
    return {"bad": bad, "sizes": sorted(sizes), "colour": colour}


def _scan_file(scan_dir: Path, fingerprint: str) -> Path:
    return Path(scan_dir) / f"scan-{fingerprint[:16]}.json"


def _read_scan(scan_dir: Path | None, fingerprint: str) -> dict | None:
    """The header scan of files with this fingerprint, if one was kept; None if not."""
    if scan_dir is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_scan_file(scan_dir, fingerprint).read_text())
    return None


def keep_scan(source: Source, scan_dir: Path) -> None:
    """Keep `source`'s header scan in `scan_dir`, so that a restart reads no header again."""
    if source.scan is not None:
        path = _scan_file(scan_dir, source.fingerprint)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):  # Without it, the next start scans again.
            partial.write_text(json.dumps(source.scan) + "\n")
            partial.replace(path)


def _shown(file: Path, folder: Path) -> bool:
    return not any(part.startswith(".") for part in file.relative_to(folder).parts)


def _header(file: Path) -> tuple[str, tuple[int, int], bool] | None:
    """(mode, (width, height), whether a palette is all grey) from the file's header; None: no image."""
    try:
        with Image.open(file) as image:
            if image.format not in IMAGE_FORMATS:
                return None
            palette = image.getpalette() if image.mode in ("P", "PA") else None
            grey_palette = palette is not None and all(
                palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3)
            )
            return image.mode, image.size, grey_palette
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def read_image(file: Path, channels: int) -> np.ndarray:
    """The first frame of an image file as uint8 (H, W, channels): alpha dropped, colour or grey converted."""
    with Image.open(file) as image:
        image.seek(0)
        if image.mode.startswith("I;16"):  # 16-bit grey: keep the high byte.
            pixels = (np.asarray(image, np.uint16) >> 8).astype(np.uint8)
        else:
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    return to_channels(pixels, channels)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (..., H, W) or (..., H, W, C) -> (..., H, W, channels): alpha dropped, grey <-> RGB."""
    if images.ndim in (2, 3) and (images.ndim == 2 or images.shape[-1] not in (1, 2, 3, 4)):
        images = images[..., None]  # (H, W) or (N, H, W): grey without a channel axis.
    if images.shape[-1] in (2, 4):  # Grey + alpha, RGB + alpha.
        images = images[..., :-1]
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    # ITU-R 601-2 luma, as Pillow's convert("L") computes it.
    weights = np.asarray([299, 587, 114], np.uint32)
    return ((images.astype(np.uint32) @ weights + 500) // 1000).astype(np.uint8)[..., None]


def _open_npz(path: Path) -> Source:
    try:
        with np.load(path, allow_pickle=False) as npz:
            contents = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"config.data.source_dir={str(path)!r} is neither a folder nor a readable .npz file "
            f"({error}). Save arrays with np.savez(path, x_train=..., y_train=...)."
        ) from None
    if "x_train" not in contents or "y_train" not in contents:
        raise ValueError(
            f"{path} holds {sorted(contents)}, but needs x_train (N, H, W[, C]) uint8 images and "
            "y_train (N,) integer labels (optionally x_val, y_val, x_test, y_test, class_names)."
        )
    names = contents.get("class_names")
    arrays, labels, files = {}, {}, {}
    for split in SPLITS:
        x, y = contents.get(f"x_{split}"), contents.get(f"y_{split}")
        if (x is None) != (y is None):
            raise ValueError(
                f"{path} holds only one of x_{split} and y_{split}: give both or neither."
            )
        if x is None:
            arrays[split], labels[split], files[split] = None, np.zeros(0, np.int64), []
            continue
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] > 4):
            raise ValueError(
                f"{path}: x_{split} is {x.dtype} {x.shape}; expected uint8 images (N, H, W) or "
                "(N, H, W, C) with C 1-4. Convert with (x * 255).round().astype(np.uint8) if "
                "they are floats in [0, 1]."
            )
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{path}: y_{split} is {y.dtype} {y.shape} for x_{split} of {len(x)} images; "
                f"expected {len(x)} integer labels, shape ({len(x)},)."
            )
        arrays[split], labels[split], files[split] = x, y.astype(np.int64), list(range(len(x)))
    num_classes = len(names) if names is not None else int(labels["train"].max(initial=0)) + 1
    for split in SPLITS:
        outside = labels[split][(labels[split] < 0) | (labels[split] >= num_classes)]
        if len(outside):
            raise ValueError(
                f"{path}: y_{split} holds labels {sorted(set(outside.tolist()))[:5]} outside "
                f"0..{num_classes - 1} ({num_classes} classes"
                f"{', from class_names' if names is not None else ''}). Labels must be 0..K-1."
            )
    if num_classes < 2 or len(np.unique(labels["train"])) < 2:
        raise ValueError(f"{path}: y_train holds a single class; classification needs at least 2.")
    class_names = (
        tuple(str(n) for n in names)
        if names is not None
        else tuple(str(i) for i in range(num_classes))
    )
    channel_counts = {1 if x.ndim == 3 else x.shape[-1] for x in arrays.values() if x is not None}
    sizes = {(x.shape[2], x.shape[1]) for x in arrays.values() if x is not None}
    stat = path.stat()
    fingerprint = hashlib.sha256(
        f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    ).hexdigest()
    return Source(
        path,
        class_names,
        files,
        labels,
        frozenset(sizes),
        bool(channel_counts & {3, 4}),
        fingerprint,
        arrays,
    )


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) of `labels` (n,): each class split by `fractions` (val, test), seeded.

    Every class with 3 or more examples gives at least one to each split asked for (fraction
    > 0); the split depends only on (labels, fractions, seed).
    """
    parts = ([], [], [])
    for label in np.unique(labels):
        members = np.random.default_rng([seed, int(label)]).permutation(
            np.flatnonzero(labels == label)
        )
        # A class of 3 or more gives each split asked for at least one example.
        small = len(members) < 3
        val, test = (round(f * len(members)) or int(f > 0 and not small) for f in fractions)
        parts[1].append(members[:val])
        parts[2].append(members[val : val + test])
        parts[0].append(members[val + test :])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
