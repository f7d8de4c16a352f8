"""Dataset layouts and manifests: what a dataset root holds, listed once into one table.

Three layouts under a root URI (any URI :mod:`pipeline.storage` resolves):

- ``voc``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs whose
  indices are class ids), ``ImageSets/Segmentation/<split>.txt`` (one id per line);
- ``generic``: ``images/<id>.<ext>`` and ``masks/<id>.png`` (or ``.tif``) matched by path
  without suffix, optional ``splits/<split>.txt``;
- ``images``: image files at any depth, no masks (inference); the id is the path relative
  to the root without its suffix (with it, where two files would share an id).

``classes.txt`` at the root names the classes (one per line, index = class id); a VOC root
without one has the 21 VOC classes.

A manifest is a Parquet table, one row per sample (:data:`MANIFEST_SCHEMA`), with the
root, layout, class names and split sizes in its schema metadata. Build it once for a large
bucket (:func:`build_manifest`, :func:`write_manifest`); jobs take a root or a ``.parquet``
manifest URI alike (:func:`load_manifest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.storage import (
    FileInfo,
    Location,
    StorageOptions,
    exists,
    list_files,
    read_bytes,
    resolve,
    write_bytes,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_SCHEMA",
    "DatasetError",
    "DatasetInfo",
    "Layout",
    "LayoutChoice",
    "ManifestMeta",
    "build_manifest",
    "check_manifest",
    "dataset_info",
    "detect_layout",
    "is_plain_name",
    "load_manifest",
    "manifest_hash",
    "manifest_meta",
    "manifest_versions",
    "read_manifest",
    "write_manifest",
]


Layout = Literal["voc", "generic", "images"]
"""A dataset layout (see the module docstring)."""


LayoutChoice = Literal["auto", "voc", "generic", "images"]
"""A layout, or ``"auto"`` to detect it (:func:`detect_layout`)."""


IMAGE_SUFFIXES: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)
"""File suffixes listed as images (case-insensitive)."""

_MASK_SUFFIXES = (".png", ".tif", ".tiff")
"""Masks: label PNGs, or label TIFFs (large scenes: read by window when tiled)."""


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string()),
        pa.field("split", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("image_version", pa.string()),
    ]
)
"""One row per sample. ``mask_uri`` is null without a mask, ``split`` null outside any split
file, ``bytes`` (the image's size) null where a split file names an id without an image.
``image_version`` is what changes when the image object is rewritten, from the listing itself
(:attr:`pipeline.storage.FileInfo.version`: the ETag, else size and modification time); null
without an image, or in a manifest written before the column existed."""

_HASHED_COLUMNS = ("image_id", "image_uri", "mask_uri", "split", "bytes")
"""What :func:`manifest_hash` covers: the samples, not their objects' versions (so a model
card's hash stays comparable with manifests written before versions were listed)."""


_META_KEY = b"fcnpipe.manifest"


_LIST_THREADS = 8


_SPLIT_PREFERENCE = ("train", "val", "test")


class DatasetError(InputError, ValueError):
    """A dataset root or manifest that cannot be used as asked (the message says why)."""


@dataclass(frozen=True, kw_only=True)
class ManifestMeta:
    """What a manifest records besides its rows (kept in its Parquet schema metadata)."""

    root: str | None
    """The dataset root it was built from."""
    layout: Layout | None
    """The layout of that root."""
    class_names: tuple[str, ...] | None
    """Class names (index = class id), or None where the dataset names none."""
    splits: Mapping[str, int]
    """Number of ids in each split file."""


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """A summary of a dataset root or manifest."""

    uri: str
    """The root or manifest URI."""
    layout: Layout | None
    """Its layout (None for a manifest without metadata)."""
    num_images: int
    """Images that exist."""
    num_with_masks: int
    """Images that exist and have a mask."""
    num_missing: int
    """Ids named by a split file without an image."""
    splits: Mapping[str, int]
    """Ids per split file (a VOC ``trainval`` overlaps ``train`` and ``val``)."""
    class_names: tuple[str, ...] | None
    """Class names, or None where the dataset names none."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "uri": self.uri,
            "layout": self.layout,
            "num_images": self.num_images,
            "num_with_masks": self.num_with_masks,
            "num_missing": self.num_missing,
            "splits": dict(self.splits),
            "class_names": None if self.class_names is None else list(self.class_names),
        }


def detect_layout(uri: str | Location, options: StorageOptions | None = None) -> Layout:
    """The layout of a dataset root: ``voc`` with ``JPEGImages/``, ``generic`` with
    ``images/``, else ``images``.

    Args:
        uri: The dataset root.
        options: Storage options.
    """
    root = resolve(uri, options)
    with ThreadPoolExecutor(2) as pool:
        voc = pool.submit(exists, root.join("JPEGImages"))
        generic = pool.submit(exists, root.join("images"))
        if voc.result():
            return "voc"
        return "generic" if generic.result() else "images"


def build_manifest(
    uri: str | Location,
    *,
    layout: LayoutChoice = "auto",
    split: str | None = None,
    options: StorageOptions | None = None,
) -> pa.Table:
    """List a dataset root into a manifest (:data:`MANIFEST_SCHEMA`, metadata included).

    The layout's directories are listed concurrently. With ``split``, the rows are the ids of
    that split file in its order; without, every image sorted by id (each labelled with the
    smallest split file naming it, so ``train`` rather than ``trainval``), then the ids that
    split files name without an image. Such ids, and ids with ``..`` in them, stay rows:
    reading them gives error rows.

    Args:
        uri: The dataset root.
        layout: The layout, or ``"auto"``.
        split: A split name, or None.
        options: Storage options.

    Raises:
        DatasetError: No images under the root, an unknown split, ambiguous ids, or a bad
            ``classes.txt`` (the message names the URI).
    """
    root = resolve(uri, options)
    if split is not None and not is_plain_name(split):
        raise DatasetError(f"split must be a plain name like 'train', got {split!r}")
    kind = detect_layout(root) if layout == "auto" else layout
    if kind not in get_args(Layout):
        raise DatasetError(f"layout must be one of {get_args(LayoutChoice)}, got {layout!r}")
    if kind == "images":
        if split is not None:
            raise DatasetError(
                f"{root.uri}: an images-only dataset has no splits (asked {split!r})"
            )
        splits: dict[str, int] = {}
        rows, classes = _images_rows(root), None
    else:
        rows, classes, splits = _paired_rows(root, kind, split)
    if not rows:
        raise DatasetError(f"no images found under {root.uri} (layout {kind})")
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    meta = ManifestMeta(root=root.uri, layout=kind, class_names=classes, splits=splits)
    return _with_meta(table, meta)


def write_manifest(
    table: pa.Table, uri: str | Location, options: StorageOptions | None = None
) -> None:
    """Write a manifest as one Parquet object (zstd), atomically.

    Args:
        table: A manifest (:data:`MANIFEST_SCHEMA`; its metadata is kept).
        uri: Where to write, usually ending in ``.parquet``.
        options: Storage options.
    """
    table = check_manifest(table, str(uri))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(resolve(uri, options), buf.getvalue())


def read_manifest(uri: str | Location, options: StorageOptions | None = None) -> pa.Table:
    """Read a manifest written by :func:`write_manifest` (or any Parquet file with its columns).

    Args:
        uri: The manifest's URI.
        options: Storage options.

    Raises:
        DatasetError: Not Parquet, or columns missing.
        FileNotFoundError: No such object.
    """
    data = read_bytes(resolve(uri, options))
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{uri}: not a Parquet manifest: {exc}") from exc
    return check_manifest(table, str(uri))


def load_manifest(
    uri_or_manifest: str | Location,
    split: str | None = None,
    *,
    layout: LayoutChoice = "auto",
    options: StorageOptions | None = None,
) -> pa.Table:
    """The manifest of a job's input: read a ``.parquet`` manifest, or list a dataset root.

    Args:
        uri_or_manifest: A dataset root, or a manifest URI ending in ``.parquet``.
        split: Keep this split only (a manifest keeps rows whose ``split`` equals it).
        layout: Layout of a dataset root.
        options: Storage options.

    Raises:
        DatasetError: Nothing to read (the message names the URI).
    """
    uri = str(uri_or_manifest)
    if not uri.lower().endswith(".parquet"):
        return build_manifest(uri_or_manifest, layout=layout, split=split, options=options)
    table = read_manifest(uri_or_manifest, options)
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        where = f" in split {split!r}" if split is not None else ""
        raise DatasetError(f"no images found in manifest {uri}{where}")
    return table


def manifest_meta(table: pa.Table) -> ManifestMeta:
    """The metadata of a manifest (all None/empty for a plain Parquet table).

    Args:
        table: A manifest.
    """
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        return ManifestMeta(root=None, layout=None, class_names=None, splits={})
    meta = json.loads(raw)
    names = meta.get("class_names")
    return ManifestMeta(
        root=meta.get("root"),
        layout=meta.get("layout"),
        class_names=None if names is None else tuple(names),
        splits={str(k): int(v) for k, v in (meta.get("splits") or {}).items()},
    )


def manifest_hash(table: pa.Table) -> str:
    """A SHA-256 of a manifest's rows (ids, URIs, splits, sizes; order-independent).

    Args:
        table: A manifest.
    """
    digest = hashlib.sha256()
    columns = [table[name].to_pylist() for name in _HASHED_COLUMNS]
    for row in sorted(zip(*columns, strict=True), key=lambda r: (r[0], r[1])):
        digest.update(json.dumps(row).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def manifest_versions(table: pa.Table) -> pa.ChunkedArray:
    """Each row's image version, never null: ``image_version``; else, in a manifest without
    it, ``size:<bytes>``; else (no image) ``missing``.

    Args:
        table: A manifest.
    """
    sizes = pc.binary_join_element_wise("size:", table["bytes"].cast(pa.string()), "")
    out = pc.coalesce(table["image_version"], sizes, pa.scalar("missing"))
    return out if isinstance(out, pa.ChunkedArray) else pa.chunked_array([out])


def dataset_info(
    uri: str | Location,
    *,
    layout: LayoutChoice = "auto",
    options: StorageOptions | None = None,
) -> DatasetInfo:
    """Summarise a dataset root or a ``.parquet`` manifest.

    Args:
        uri: The root or manifest URI.
        layout: Layout of a root.
        options: Storage options.

    Raises:
        DatasetError: No images found.
    """
    table = load_manifest(uri, layout=layout, options=options)
    meta = manifest_meta(table)
    # In a manifest built here a null size means "named by a split file, no image"; a
    # hand-made manifest may simply not know sizes.
    present = (
        pc.is_valid(table["bytes"]) if meta.root is not None else pc.is_valid(table["image_uri"])
    )
    has_mask = pc.and_(present, pc.is_valid(table["mask_uri"]))
    num_images = pc.sum(present.cast(pa.int64())).as_py() or 0
    return DatasetInfo(
        uri=str(uri),
        layout=meta.layout,
        num_images=num_images,
        num_with_masks=pc.sum(has_mask.cast(pa.int64())).as_py() or 0,
        num_missing=table.num_rows - num_images,
        splits=meta.splits,
        class_names=meta.class_names,
    )


def is_plain_name(name: str) -> bool:
    """Whether ``name`` (a split) is one path component: no separators, not ``.``/``..``."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _concat(base: str, rel: str) -> str:
    """Join without normalising: a hostile id stays visible and fails when read."""
    return f"{base.rstrip('/')}/{rel}"


def _stem(relpath: str) -> str:
    return posixpath.splitext(relpath)[0]


def _paired_rows(
    root: Location, layout: Layout, split: str | None
) -> tuple[list[dict[str, Any]], tuple[str, ...] | None, dict[str, int]]:
    """Rows of a VOC or generic root: images and masks matched by id, split files applied."""
    image_dir, mask_dir, split_dir = (
        ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
        if layout == "voc"
        else ("images", "masks", "splits")
    )
    with ThreadPoolExecutor(_LIST_THREADS) as pool:
        images_f = pool.submit(list_files, root.join(image_dir), IMAGE_SUFFIXES)
        masks_f = pool.submit(list_files, root.join(mask_dir), _MASK_SUFFIXES)
        splits_f = pool.submit(list_files, root.join(split_dir), (".txt",))
        classes_f = pool.submit(_read_classes, root, layout)
        split_loc = root.join(split_dir)
        split_files = {
            _stem(f.relpath): split_loc.join(f.relpath)
            for f in splits_f.result()
            if "/" not in f.relpath
        }
        wanted = [split] if split is not None else sorted(split_files)
        if split is not None and split not in split_files:
            available = ", ".join(sorted(split_files)) or "none"
            raise DatasetError(
                f"no split {split!r} under {root.join(split_dir).uri} (available: {available})"
            )
        id_lists: dict[str, Future[list[str]]] = {
            name: pool.submit(_read_ids, split_files[name]) for name in wanted
        }
        images = _by_id(images_f.result(), root.join(image_dir).uri)
        masks = _by_id(masks_f.result(), root.join(mask_dir).uri)
        split_ids = {name: f.result() for name, f in id_lists.items()}
        classes = classes_f.result()
    splits = {name: len(ids) for name, ids in split_ids.items()}
    if not images:
        raise DatasetError(f"no images found under {root.join(image_dir).uri} ({layout} layout)")

    def row(image_id: str, split_name: str | None) -> dict[str, Any]:
        info = images.get(image_id)
        image_uri = info.uri if info else _concat(root.join(image_dir).uri, f"{image_id}.jpg")
        mask = masks.get(image_id)
        return {
            "image_id": image_id,
            "image_uri": image_uri,
            "mask_uri": mask.uri if mask else None,
            "split": split_name,
            "bytes": info.size if info else None,
            "image_version": info.version if info else None,
        }

    if split is not None:
        ids = list(dict.fromkeys(split_ids[split]))
        if not ids:
            raise DatasetError(f"no images found: split file {split_files[split].uri} is empty")
        return [row(i, split) for i in ids], classes, splits
    primary: dict[str, str] = {}
    for name in sorted(split_ids, key=lambda n: (len(split_ids[n]), _split_rank(n))):
        for image_id in split_ids[name]:
            primary.setdefault(image_id, name)
    rows = [row(i, primary.get(i)) for i in sorted(images)]
    rows += [row(i, primary[i]) for i in sorted(set(primary) - set(images))]
    return rows, classes, splits


def _split_rank(name: str) -> tuple[int, str]:
    rank = _SPLIT_PREFERENCE.index(name) if name in _SPLIT_PREFERENCE else len(_SPLIT_PREFERENCE)
    return rank, name


def _images_rows(root: Location) -> list[dict[str, Any]]:
    """Rows of an images-only root: every image file, id = relative path without suffix."""
    files = list_files(root, IMAGE_SUFFIXES)
    stems: dict[str, int] = {}
    for f in files:
        stems[_stem(f.relpath)] = stems.get(_stem(f.relpath), 0) + 1
    return [
        {
            "image_id": f.relpath if stems[_stem(f.relpath)] > 1 else _stem(f.relpath),
            "image_uri": f.uri,
            "mask_uri": None,
            "split": None,
            "bytes": f.size,
            "image_version": f.version,
        }
        for f in files
    ]


def _by_id(files: list[FileInfo], where: str) -> dict[str, FileInfo]:
    found: dict[str, FileInfo] = {}
    clashes: list[str] = []
    for f in files:
        key = _stem(f.relpath)
        if key in found:
            clashes.append(f"{found[key].relpath} / {f.relpath}")
        found[key] = f
    if clashes:
        raise DatasetError(
            f"{where}: files share an id (path without suffix): {'; '.join(clashes[:5])}"
        )
    return found


def _read_ids(loc: Location) -> list[str]:
    """Ids of a split file: the first word of each non-empty line."""
    try:
        text = read_bytes(loc).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{loc.uri}: split file is not UTF-8 text: {exc}") from exc
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def _read_classes(root: Location, layout: Layout) -> tuple[str, ...] | None:
    """``classes.txt`` (one name per line), else the VOC names for a VOC root, else None."""
    loc = root.join("classes.txt")
    try:
        text = read_bytes(loc).decode("utf-8")
    except FileNotFoundError:
        if layout != "voc":
            return None
        from fcn.palette import VOC_CLASSES

        return VOC_CLASSES
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{loc.uri}: not UTF-8 text: {exc}") from exc
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or "" in names or len(names) > 255:
        raise DatasetError(
            f"{loc.uri}: expected 1 to 255 class names, one per line without blank lines "
            f"(line index = class id), got {len(names)} lines"
        )
    return tuple(names)


def _with_meta(table: pa.Table, meta: ManifestMeta) -> pa.Table:
    payload = {
        "version": 1,
        "root": meta.root,
        "layout": meta.layout,
        "class_names": None if meta.class_names is None else list(meta.class_names),
        "splits": dict(meta.splits),
    }
    return table.replace_schema_metadata({_META_KEY: json.dumps(payload).encode()})


def check_manifest(table: pa.Table, where: str) -> pa.Table:
    """The manifest columns of ``table``, cast to :data:`MANIFEST_SCHEMA`, metadata kept.

    Raises:
        DatasetError: ``image_id`` or ``image_uri`` is missing (the message names ``where``).
    """
    missing = [n for n in ("image_id", "image_uri") if n not in table.column_names]
    if missing:
        raise DatasetError(f"{where}: not a manifest, columns {missing} missing")
    n = table.num_rows
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
        for f in MANIFEST_SCHEMA
    ]
    out = pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA.with_metadata(None))
    return out.replace_schema_metadata(table.schema.metadata)
