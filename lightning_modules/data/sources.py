"""Listing the image files of an image-folder tree or of a tar archive of one.

The expected layout is ``train/<class>/<image>`` and optionally ``test/<class>/<image>``,
either directly in the folder or archive or under one top folder, such as
``cifar10/train/airplane/0000.jpg``. Images may sit deeper inside a class folder, as with
torchvision's ``ImageFolder``. Archives are read as a stream with `tarfile`, so nothing
is unpacked to disk.
"""

import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lightning_modules.data.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "test")
EXPECTED_LAYOUT = (
    "train/<class>/<image> and optionally test/<class>/<image>, either directly inside "
    "or under one top folder (such as cifar10/train/airplane/0000.jpg)"
)

# Errors that a damaged or truncated archive raises while it is read.
ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


@dataclass(frozen=True)
class ImageFile:
    """One image file of the layout, not yet read.

    Attributes:
        split: ``"train"`` or ``"test"``.
        class_name: name of the class folder.
        name: path below the class folder, such as ``0001.jpg``.
        location: the file's path, or the member name and the archive path, for messages.
        read: returns the file's bytes. For archives it must be called before the next
            file is requested, because the archive is read as a stream.
    """

    split: str
    class_name: str
    name: str
    location: str
    read: Callable[[], bytes]


def is_image_name(name: str, extensions: Collection[str]) -> bool:
    """Return whether the file name ends with one of ``extensions``, such as ``.png``."""
    return os.path.splitext(name)[1].lower() in extensions


def is_hidden(part: str) -> bool:
    """Return whether a path component is hidden or macOS archive metadata."""
    return part.startswith(".") or part == "__MACOSX"


def find_image_folder_root(path: Path) -> Path | None:
    """Return the folder that contains ``train/`` or ``test/``: ``path`` or its one subfolder.

    Returns None when neither ``path`` nor exactly one of its subfolders contains them.

    Raises:
        DataError: when several subfolders contain them, so the data set is ambiguous.
    """
    if any((path / split).is_dir() for split in SPLIT_NAMES):
        return path

    candidates = sorted(
        child
        for child in path.iterdir()
        if child.is_dir() and not is_hidden(child.name) and any((child / split).is_dir() for split in SPLIT_NAMES)
    )
    if len(candidates) > 1:
        names = ", ".join(str(candidate) for candidate in candidates)
        raise DataError(
            f"{path} contains several image folders with train/ or test/: {names}. Pass one of them as data.path."
        )
    return candidates[0] if candidates else None


def iter_image_files(path: Path) -> Iterator[ImageFile]:
    """Yield the image files of the image folder or tar archive at ``path``.

    Directories are listed in sorted order, ``train/`` first, and archives in member order.
    Hidden files, files directly in ``train/`` or ``test/``, and files whose extension
    Pillow does not know are skipped, and the number skipped is logged.

    Raises:
        DataError: when ``path`` does not exist, is neither a folder nor a tar archive, the
            archive is damaged, or no image follows the expected layout.
    """
    if path.is_dir():
        root = find_image_folder_root(path)
        if root is None:
            raise layout_error(path, sorted(child.name for child in path.iterdir()))
        files = iter_directory_files(root)
        matcher = LayoutMatcher(root=())
    elif path.is_file():
        files = iter_archive_files(path)
        matcher = LayoutMatcher()
    else:
        raise DataError(
            f"Image folder or archive {path} not found. Set data.path to an existing folder or .tar/.tar.gz archive."
        )

    found = 0
    for relative_name, location, read in files:
        match = matcher.match(relative_name)
        if match is None:
            continue
        split, class_name, name = match
        found += 1
        yield ImageFile(split, class_name, name, location, read)

    if matcher.skipped:
        logger.info(
            "Skipped %d files in %s that are not images in the layout %s", matcher.skipped, path, EXPECTED_LAYOUT
        )
    if found == 0:
        raise layout_error(path, sorted(matcher.top_names))


def layout_error(path: Path, top_names: list[str]) -> DataError:
    """Build the DataError for a folder or archive without images in the expected layout."""
    listed_names = ", ".join(top_names[:10]) + (", ..." if len(top_names) > 10 else "")
    return DataError(
        f"{path} contains no images in the expected layout: {EXPECTED_LAYOUT}. "
        f"Its top level contains: {listed_names or 'nothing'}. "
        f"Rearrange the files into this layout or pass the folder that contains train/ as data.path."
    )


class LayoutMatcher:
    """Matcher of relative file names against the layout ``[<top>/]<split>/<class>/<image>``.

    Unless ``root`` gives the top folders, the first image whose name matches fixes them
    (none or one folder) for all later files, so that one archive cannot mix two data sets.
    """

    def __init__(self, root: tuple[str, ...] | None = None) -> None:
        self.root = root
        # Extensions of the formats that Pillow can decode, such as .png and .jpg.
        self.image_extensions = frozenset(Image.registered_extensions())
        self.skipped = 0
        self.top_names: set[str] = set()

    def match(self, relative_name: str) -> tuple[str, str, str] | None:
        """Return ``(split, class_name, name)`` for an image in the layout, else None."""
        parts = [part for part in relative_name.split("/") if part not in ("", ".")]
        if not parts or any(is_hidden(part) for part in parts):
            return None
        self.top_names.add(parts[0])
        if not is_image_name(parts[-1], self.image_extensions):
            self.skipped += 1
            return None

        if self.root is None:
            self.root = self.find_root(parts)
            if self.root is None:
                self.skipped += 1
                return None

        depth = len(self.root)
        if tuple(parts[:depth]) != self.root or len(parts) < depth + 3 or parts[depth] not in SPLIT_NAMES:
            self.skipped += 1
            return None
        return parts[depth], parts[depth + 1], "/".join(parts[depth + 2 :])

    @staticmethod
    def find_root(parts: list[str]) -> tuple[str, ...] | None:
        """Return the top folders before ``train/`` or ``test/`` (none or one), else None."""
        for depth in (0, 1):
            if len(parts) >= depth + 3 and parts[depth] in SPLIT_NAMES:
                return tuple(parts[:depth])
        return None


FileEntry = tuple[str, str, Callable[[], bytes]]


def iter_directory_files(root: Path) -> Iterator[FileEntry]:
    """Yield ``(relative_name, location, read)`` for every file in ``root/train`` and ``root/test``.

    Files come in sorted order, training files first, so the first image is a training image.
    """
    for split in SPLIT_NAMES:
        for directory, subdirectories, file_names in os.walk(root / split):
            subdirectories[:] = sorted(name for name in subdirectories if not is_hidden(name))
            for file_name in sorted(file_names):
                file_path = Path(directory, file_name)
                relative_name = file_path.relative_to(root).as_posix()
                yield relative_name, str(file_path), file_reader(file_path)


def file_reader(file_path: Path) -> Callable[[], bytes]:
    """Return a function that reads the file's bytes and raises DataError when that fails."""

    def read() -> bytes:
        try:
            return file_path.read_bytes()
        except OSError as error:
            raise DataError(f"Reading {file_path} failed: {error}. Check that the file is readable.") from error

    return read


def iter_archive_files(archive: Path) -> Iterator[FileEntry]:
    """Yield ``(member_name, location, read)`` for every regular file in a tar archive.

    Compression (gzip, bzip2, xz) is detected from the content. Links and other special
    members are skipped. The archive is read once, front to back.
    """
    try:
        tar = tarfile.open(archive, "r:*")
    except ARCHIVE_ERRORS as error:
        raise DataError(
            f"{archive} is not a readable tar archive ({error}). "
            f"Pass a folder or a .tar, .tar.gz or .tgz archive as data.path."
        ) from error

    with tar:
        while True:
            try:
                member = tar.next()
            except ARCHIVE_ERRORS as error:
                raise archive_read_error(archive, error) from error
            if member is None:
                return
            if member.isfile():
                location = f"member {member.name!r} of archive {archive}"
                yield member.name, location, archive_member_reader(tar, member, archive)


def archive_member_reader(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> Callable[[], bytes]:
    """Return a function that reads one member's bytes and raises DataError on damage."""

    def read() -> bytes:
        try:
            extracted = tar.extractfile(member)
            assert extracted is not None, "extractfile returns a file object for regular members"
            return extracted.read()
        except ARCHIVE_ERRORS as error:
            raise archive_read_error(archive, error) from error

    return read


def archive_read_error(archive: Path, error: BaseException) -> DataError:
    """Build the DataError for an archive that fails while it is read."""
    return DataError(
        f"Reading archive {archive} failed: {error}. The file is damaged or truncated. "
        f"Copy or download it again, and compare its size or checksum with the source."
    )
