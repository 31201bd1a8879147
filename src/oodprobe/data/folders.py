"""Image files on disk: class-per-subfolder trees, flat folders, and text lists of paths.

How folders are walked (the same rules for every layout):

* Hidden entries (names starting with ``.``) are ignored; so are files without an image
  extension.
* Symbolic links are followed, to files and to folders, with these exceptions, each listed as a
  skip record in ``scan_skipped`` (``SkippedImage(-1, path, reason)``, sorted by path, reported
  by extraction in ``FeatureSet.skipped``): a link to a folder that is one of its own ancestors
  (a symbolic-link loop, not followed), a second path to a folder already walked (walked
  once), a dangling link, a link that loops on itself (``a -> b -> a``), a folder that cannot
  be read.
* An image file is counted once: a second path to the same file (same device and inode: a
  symbolic link or a hard link) is listed as ``same file as COUNTED; counted once``. The path
  counted (and so the class) is the file's own path when the folder holds one: real folders
  and files are walked first (depth first, sorted by name), symbolic links after them in the
  order met; among hard links, or among links only, the first met counts. None of these
  records loses a decodable image, so ``on_error="raise"`` does not stop on them.
* Any name the OS allows works (non-UTF-8 bytes, newlines, spaces, quotes, leading dashes):
  paths are kept as Python ``str`` with ``surrogateescape``; ``describe()``, class names, the
  dataset name and error messages are printable text (:func:`printable_path`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from oodprobe.classnames import imagenet_names_for_folders
from oodprobe.data.base import SCAN_INDEX, ImageDataset, SkippedImage, printable_path
from oodprobe.data.decode import REASON_DANGLING, REASON_LOOP, decode_image
from oodprobe.errors import DataError

#: File extensions (lower case, with the dot) that count as images when scanning folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_EXTENSION_LIST = ", ".join(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))

Identity = tuple[int, int]


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive) and is not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class _Found:
    """An image file found by a scan, with the stat that the fingerprint hashes."""

    relpath: str
    size: int
    mtime_ns: int


def _identity(info: os.stat_result) -> Identity | None:
    # Some network and FUSE file systems report inode 0 for every file: no identity then.
    return (info.st_dev, info.st_ino) if info.st_ino else None


def _join(relative: str, name: str) -> str:
    return f"{relative}/{name}" if relative else name


def _link_problem(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return REASON_DANGLING
    if error.errno == errno.ELOOP:
        return REASON_LOOP
    return f"cannot read: {error.strerror or error}"


@dataclass(frozen=True)
class _Entry:
    """A non-hidden folder entry: its stat (links followed; None for a non-image file)."""

    relpath: str
    info: os.stat_result | None
    is_folder: bool
    is_link: bool


@dataclass(frozen=True)
class _Link:
    """A symbolic link met in the first pass, followed in the second."""

    entry: _Entry
    ancestors: dict[Identity, str]
    label: int


class _Scanner:
    """Walks folders by the rules in this module's docstring; one scanner per dataset.

    Two passes, so that a file or folder is counted at its own path whenever the tree holds it:
    the first walks real folders and files only and sets the symbolic links aside; the second
    follows those links (and everything under them) in the order they were met.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.skipped: list[SkippedImage] = []
        self.counted: dict[Identity, str] = {}  # file identity -> the path that counted
        self.walked: dict[Identity, str] = {}  # folder identity -> the path walked
        self.found: list[tuple[int, _Found]] = []  # (label, image) in the order counted
        self.links: list[_Link] = []

    def skip(self, relpath: str, reason: str) -> None:
        source = printable_path(os.path.join(self.root, relpath))
        self.skipped.append(SkippedImage(SCAN_INDEX, source, reason))

    def entries(self, relative: str) -> list[_Entry]:
        """The non-hidden entries of a folder, sorted by name; broken links recorded as skipped.

        Costs one ``stat`` per folder, image file and link (none for other files).
        """
        folder = os.path.join(self.root, relative) if relative else str(self.root)
        try:
            with os.scandir(folder) as listing:
                found = sorted(
                    (entry for entry in listing if not entry.name.startswith(".")),
                    key=lambda entry: entry.name,
                )
        except OSError as error:
            self.skip(relative, f"cannot read folder: {error.strerror or error}")
            return []
        entries = []
        for entry in found:
            relpath = _join(relative, entry.name)
            try:
                if entry.is_symlink():
                    info = entry.stat()  # follows the link: loops and dangling links fail here
                    entries.append(_Entry(relpath, info, stat.S_ISDIR(info.st_mode), True))
                elif entry.is_dir(follow_symlinks=False):
                    entries.append(_Entry(relpath, entry.stat(follow_symlinks=False), True, False))
                elif is_image_file(entry.name):
                    entries.append(_Entry(relpath, entry.stat(follow_symlinks=False), False, False))
                else:
                    entries.append(_Entry(relpath, None, False, False))
            except OSError as error:
                self.skip(relpath, _link_problem(error))
        return entries

    def count(self, relpath: str, info: os.stat_result, label: int) -> None:
        """Count the image at ``relpath`` unless the same file was counted already."""
        identity = _identity(info)
        if identity is not None:
            if identity in self.counted:
                first = printable_path(self.counted[identity])
                self.skip(relpath, f"same file as {first}; counted once")
                return
            self.counted[identity] = relpath
        self.found.append((label, _Found(relpath, info.st_size, info.st_mtime_ns)))

    def walk(self, relative: str, ancestors: dict[Identity, str], label: int, follow: bool) -> None:
        """Count the images under ``relative``; without ``follow``, set links aside."""
        for entry in self.entries(relative):
            if entry.is_link and not follow:
                self.links.append(_Link(entry, ancestors, label))
            else:
                self.visit(entry, ancestors, label, follow)

    def visit(
        self, entry: _Entry, ancestors: dict[Identity, str], label: int, follow: bool
    ) -> None:
        info, relpath = entry.info, entry.relpath
        if info is None:
            return
        if not entry.is_folder:
            if is_image_file(os.path.basename(relpath)) and stat.S_ISREG(info.st_mode):
                self.count(relpath, info, label)
            return
        identity = _identity(info)
        if identity is not None and identity in ancestors:
            target = printable_path(ancestors[identity] or ".")
            self.skip(relpath, f"{REASON_LOOP} (back to {target}); not followed")
            return
        if identity is not None and identity in self.walked:
            first = printable_path(self.walked[identity])
            self.skip(relpath, f"same folder as {first}; walked once")
            return
        if identity is not None:
            self.walked[identity] = relpath
        inner = {**ancestors, identity: relpath} if identity is not None else ancestors
        self.walk(relpath, inner, label, follow)

    def follow_links(self) -> None:
        """The second pass: follow the links the first one set aside, in the order met."""
        for link in self.links:
            self.visit(link.entry, link.ancestors, link.label, follow=True)
        self.links = []


def _fingerprint(kind: str, entries: Sequence[str], labels: np.ndarray | None) -> str:
    """Hash of the ordered ``relpath\\0size\\0mtime_ns`` entries and the labels."""
    digest = hashlib.sha256(kind.encode())
    for entry in entries:
        digest.update(entry.encode("utf-8", "surrogateescape"))
    if labels is not None:
        digest.update(labels.tobytes())
    return digest.hexdigest()


def _entry(image: _Found) -> str:
    return f"{image.relpath}\0{image.size}\0{image.mtime_ns}\n"


def read_class_names_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read an ImageNet-style ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca`` lines.

    Returns ``{folder name: first listed name}``; blank lines and ``#`` comments are ignored.
    """
    mapping: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(f"cannot read class names file {path}: {error.strerror or error}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise DataError(
                f"{path} line {number}: expected 'FOLDER NAME[, OTHER NAMES]', got {line!r}"
            )
        mapping[parts[0]] = parts[1].split(",")[0].strip()
    return mapping


class _FileDataset(ImageDataset):
    """Shared parts of datasets backed by files listed relative to a root folder."""

    root: str
    relpaths: tuple[str, ...]
    max_pixels: int | None
    _fingerprint: str

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, index: int) -> str:
        """Path of image ``index`` (the root joined with its listed path), for opening it."""
        return os.path.join(self.root, self.relpaths[index])

    def load(self, index: int) -> Image.Image:
        return decode_image(self.path(index), max_pixels=self.max_pixels, name=self.describe(index))

    def describe(self, index: int) -> str:
        """The path as printable text (see :func:`printable_path`)."""
        return printable_path(self.path(index))

    def fingerprint(self) -> str:
        """Hash of the ordered (listed path, size, mtime_ns) and the labels.

        Taken from the stat made when the dataset was built (one per file, once per object).
        """
        return self._fingerprint


class ImageFolderDataset(_FileDataset):
    """Images in a folder: one subfolder per class (labelled) or loose files (unlabelled).

    Layout is decided by the top level of ``root``: if it holds image files it is a *flat*
    folder (those files only, no labels); otherwise each non-hidden subfolder is a class, in
    sorted order (label = position), with its images found recursively. Class names are the
    folder names with underscores as spaces, or looked up in ``class_names_file`` (ImageNet's
    ``LOC_synset_mapping.txt`` format, ``n01440764 tench, Tinca tinca`` → ``tench``).
    Symbolic links, loops, duplicates and odd names follow the rules of this module's docstring:
    each image file counts once, at its own path, and what was left out is in ``scan_skipped``.
    Building the dataset stats each file once; that stat is its fingerprint.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        class_names_file: str | os.PathLike[str] | None = None,
        name: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        folder = Path(root)
        shown = printable_path(folder)
        if not folder.exists():
            raise DataError(f"{shown} does not exist; pass an image folder or a .txt file list")
        if not folder.is_dir():
            raise DataError(f"{shown} is not a folder; pass an image folder or a .txt file list")
        self.root = str(folder)
        self.name = printable_path(name if name is not None else root)
        self.max_pixels = max_pixels
        scanner = _Scanner(folder)
        top = scanner.entries("")
        images = [e for e in top if not e.is_folder and e.info is not None]
        folders = [e for e in top if e.is_folder]
        if any(is_image_file(e.relpath) and stat.S_ISREG(e.info.st_mode) for e in images if e.info):
            for entry in sorted(images, key=lambda e: e.is_link):  # a file's own path first
                scanner.visit(entry, {}, -1, follow=True)
            real_root = Path(os.path.realpath(folder))
            for entry in folders:  # images at the top make the folder flat: say what is left
                target = Path(os.path.realpath(folder / entry.relpath))
                if target == real_root or target in real_root.parents:
                    continue  # a link back up holds nothing that is not read already
                scanner.skip(
                    entry.relpath,
                    "subfolder not read: the folder has images at its top level, so it is read "
                    "as one unlabelled set; move those images into a class folder to use the "
                    "subfolders as classes",
                )
            found = sorted((image for _, image in scanner.found), key=lambda i: i.relpath)
            self.relpaths = tuple(image.relpath for image in found)
            self.labels = None
            self.class_names = None
            self.folder_names: tuple[str, ...] = ()
            self.scan_skipped = tuple(sorted(scanner.skipped, key=lambda item: item.source))
            self._fingerprint = _fingerprint(
                type(self).__name__, [_entry(image) for image in found], None
            )
            return
        if not folders:
            lost = scanner.skipped
            detail = (
                f" ({len(lost)} path(s) skipped, e.g. {lost[0].source}: {lost[0].reason})"
                if lost
                else ""
            )
            raise DataError(
                f"no images in {shown}: expected image files ({_EXTENSION_LIST}) or one "
                f"subfolder of images per class{detail}"
            )
        self._scan_classes(folder, scanner, folders, class_names_file)

    def _scan_classes(
        self,
        folder: Path,
        scanner: _Scanner,
        candidates: list[_Entry],
        class_names_file: str | os.PathLike[str] | None,
    ) -> None:
        root_identity = _identity(folder.stat())
        ancestors = {root_identity: ""} if root_identity is not None else {}
        accepted: list[tuple[_Entry, Identity | None]] = []
        for entry in sorted(candidates, key=lambda e: e.is_link):  # a folder's own path first
            assert entry.info is not None
            identity = _identity(entry.info)
            if identity is not None and identity in ancestors:
                scanner.skip(entry.relpath, f"{REASON_LOOP} (back to .); not followed")
            elif identity is not None and identity in scanner.walked:
                first = printable_path(scanner.walked[identity])
                scanner.skip(
                    entry.relpath, f"same folder as class folder {first}; not a second class"
                )
            else:
                if identity is not None:
                    scanner.walked[identity] = entry.relpath
                accepted.append((entry, identity))
        accepted.sort(key=lambda pair: pair[0].relpath)
        class_dirs = [entry.relpath for entry, _ in accepted]
        for label, (entry, identity) in enumerate(accepted):
            inner = {**ancestors, identity: entry.relpath} if identity is not None else ancestors
            scanner.walk(entry.relpath, inner, label, follow=False)
        scanner.follow_links()
        per_class: list[list[_Found]] = [[] for _ in class_dirs]
        for label, image in scanner.found:
            per_class[label].append(image)
        images: list[_Found] = []
        labels: list[int] = []
        for label, class_dir in enumerate(class_dirs):
            found = sorted(per_class[label], key=lambda image: image.relpath)
            if not found:
                prefix = printable_path(os.path.join(folder, class_dir)) + "/"
                lost = [item for item in scanner.skipped if item.source.startswith(prefix)]
                detail = (
                    f" of its own ({len(lost)} path(s) skipped, e.g. {lost[0].source}: "
                    f"{lost[0].reason})"
                    if lost
                    else ""
                )
                raise DataError(
                    f"class folder {printable_path(folder / class_dir)} has no images "
                    f"({_EXTENSION_LIST}){detail}; add images to it or remove it"
                )
            images.extend(found)
            labels.extend([label] * len(found))
        mapping = read_class_names_file(class_names_file) if class_names_file else {}
        self.folder_names = tuple(class_dirs)
        # folders named by ImageNet-1k synsets get the curated names (duplicates such as the two
        # "crane" classes told apart), unless the caller passed a mapping file of their own
        curated = None if mapping else imagenet_names_for_folders(class_dirs)
        self.class_names = (
            tuple(curated)
            if curated is not None
            else tuple(printable_path(mapping.get(d, d.replace("_", " "))) for d in class_dirs)
        )
        self.relpaths = tuple(image.relpath for image in images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.scan_skipped = tuple(sorted(scanner.skipped, key=lambda item: item.source))
        self._fingerprint = _fingerprint(
            type(self).__name__, [_entry(image) for image in images], self.labels
        )


class FileListDataset(_FileDataset):
    """Images listed in a text file, one path per line, optionally followed by an integer label.

    Paths are relative to the list's folder (absolute paths are kept). Blank lines and lines
    starting with ``#`` are ignored. A label is a second column separated by a tab, or by
    whitespace when the last word is an integer; either every line has a label or none does.
    The list is UTF-8 (a byte-order mark is allowed); bytes that are not UTF-8 are kept as the
    file names they spell (``surrogateescape``), so a list written by ``find`` works whatever
    the names. A path cannot hold a newline (one path per line) nor begin or end with spaces
    (they are stripped); a tab ends the path. Each listed file is stat-ed once, when the list is
    read: a file listed a second time (the same file, by another path too) counts once, at its
    first line, and the later lines are listed in ``scan_skipped``; a missing file stays in the
    dataset and fails at ``load`` (a skip record of the extraction).
    """

    def __init__(
        self,
        txt_path: str | os.PathLike[str],
        *,
        class_names: Sequence[str] | None = None,
        name: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        list_path = Path(txt_path)
        shown = printable_path(list_path)
        try:
            text = list_path.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            raise DataError(f"{shown} does not exist; pass a text file of image paths") from None
        except OSError as error:
            raise DataError(f"cannot read file list {shown}: {error.strerror or error}") from None
        text = text.removeprefix("\ufeff")
        self.root = str(list_path.parent)
        self.name = printable_path(name if name is not None else txt_path)
        self.max_pixels = max_pixels
        # Split on newlines only: str.splitlines would also cut at characters such as U+2028
        # that a file name may hold.
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if "\0" in line:
                raise DataError(
                    f"{shown} line {number} holds a NUL byte, which no file name can; "
                    "save the list as UTF-8 text (not UTF-16)"
                )
        entries = [_parse_line(line) for line in lines]
        numbered = [(n, e) for n, e in enumerate(entries, start=1) if e is not None]
        if not numbered:
            raise DataError(f"file list {shown} lists no images; write one path per line")
        with_label = [n for n, (_, label) in numbered if label is not None]
        if with_label and len(with_label) != len(numbered):
            without = next(n for n, (_, label) in numbered if label is None)
            raise DataError(
                f"{shown} line {without}: no label, but line {with_label[0]} has one; "
                "give every line a label or none"
            )
        kept, fingerprint_entries, skipped = self._count_once([e for _, e in numbered])
        self.relpaths = tuple(path for path, _ in kept)
        self.scan_skipped = tuple(skipped)
        if with_label:
            self.labels = np.asarray([label for _, label in kept], dtype=np.int64)
            n_classes = int(max(label for _, (_, label) in numbered if label is not None)) + 1
            if class_names is not None and len(class_names) < n_classes:
                raise DataError(
                    f"{shown} has labels up to {n_classes - 1} but only "
                    f"{len(class_names)} class names were given"
                )
            self.class_names = (
                tuple(class_names) if class_names is not None else tuple(map(str, range(n_classes)))
            )
        else:
            self.labels = None
            self.class_names = tuple(class_names) if class_names is not None else None
        self._fingerprint = _fingerprint(type(self).__name__, fingerprint_entries, self.labels)

    def _count_once(
        self, entries: list[tuple[str, int | None]]
    ) -> tuple[list[tuple[str, int | None]], list[str], list[SkippedImage]]:
        """Drop second listings of a file; the fingerprint entries of those kept."""
        counted: dict[Identity, str] = {}
        kept: list[tuple[str, int | None]] = []
        fingerprint_entries: list[str] = []
        skipped: list[SkippedImage] = []
        for relpath, label in entries:
            full = os.path.join(self.root, relpath)
            try:
                info = os.stat(full)
            except (OSError, ValueError):  # fails at load, with its reason, like any bad image
                kept.append((relpath, label))
                fingerprint_entries.append(f"{relpath}\0missing\n")
                continue
            identity = _identity(info)
            if identity is not None and identity in counted:
                first = printable_path(counted[identity])
                skipped.append(
                    SkippedImage(
                        SCAN_INDEX, printable_path(full), f"same file as {first}; counted once"
                    )
                )
                continue
            if identity is not None:
                counted[identity] = full
            kept.append((relpath, label))
            fingerprint_entries.append(f"{relpath}\0{info.st_size}\0{info.st_mtime_ns}\n")
        return kept, fingerprint_entries, skipped


def _parse_line(line: str) -> tuple[str, int | None] | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if "\t" in stripped:
        path, _, rest = stripped.partition("\t")
        rest = rest.strip()
        if rest:
            return path.strip(), _parse_label(rest, line)
        return path.strip(), None
    parts = stripped.rsplit(None, 1)
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        return parts[0], _parse_label(parts[1], line)
    return stripped, None


def _parse_label(text: str, line: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"label must be an integer >= 0, got {text!r} in line {line!r}") from None
    if label < 0:
        raise DataError(f"label must be an integer >= 0, got {label} in line {line!r}")
    return label
