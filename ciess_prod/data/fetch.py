"""``ciess data fetch``: download, verify and unpack the public benchmark archives.

Downloads are the step most likely to go wrong (no network, a proxy page instead of the zip, a truncated
file), so the archive is pinned by sha256, unpacked into a temporary directory and renamed into place only
when complete, and every failure is one actionable line. The offline half, :func:`verify_and_unpack`, also
serves hand-downloaded files.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ciess_prod.data.errors import DataError, FetchError
from ciess_prod.io import atomic_directory, sha256_file

__all__ = ["DATASETS", "FetchError", "RemoteDataset", "fetch_dataset", "verify_and_unpack"]

MARKER = (
    ".ciess-verified"  # written inside an unpacked dataset dir; holds the sha256 of the archive it came from
)
_BLOCK = 1 << 20


@dataclass(frozen=True)
class RemoteDataset:
    """A downloadable archive pinned by its sha256."""

    name: str
    url: str
    sha256: str
    size: int  # bytes, for progress messages and a quick truncation check

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# sha256 values from tensorflow/datasets tensorflow_datasets/url_checksums/movielens.txt (which also pins the
# sizes); the same values are pinned independently by the Keras-RS MovieLens example and other projects.
# They match the GroupLens md5s c4d9eecfca2ab87c1945afe126590906 (ml-1m) / 0e33842e24a9c977be4e0107933c0723.
DATASETS: dict[str, RemoteDataset] = {
    "ml-1m": RemoteDataset(
        name="ml-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        size=5_917_549,
    ),
    "ml-100k": RemoteDataset(
        name="ml-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        size=4_924_029,
    ),
}


def _safe_member(name: str, root: Path, archive: Path) -> Path:
    """Target path of a zip member; refuses absolute paths and ``..`` (zip-slip) before any write."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or (posix.parts and ":" in posix.parts[0]):
        raise FetchError(f"{archive}: refusing zip entry {name!r} that escapes the destination directory")
    target = (root / posix).resolve()
    if not target.is_relative_to(root.resolve()):
        raise FetchError(f"{archive}: refusing zip entry {name!r} that escapes the destination directory")
    return target


def _is_verified(directory: Path, expected_sha256: str) -> bool:
    marker = directory / MARKER
    return marker.is_file() and marker.read_text().strip() == expected_sha256.lower()


def verify_and_unpack(archive: str | Path, expected_sha256: str, dest_dir: str | Path) -> Path:
    """Check ``archive`` against ``expected_sha256`` and unpack it into ``dest_dir``; return ``dest_dir``.

    The zip is extracted into a sibling temporary directory that is renamed to ``dest_dir`` only when
    complete, so a failure never leaves a half-written dataset; an existing ``dest_dir`` is replaced.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise FetchError(f"{archive}: archive not found")
    actual = sha256_file(archive)
    if actual != expected_sha256.lower():
        raise FetchError(f"{archive}: sha256 mismatch: expected {expected_sha256.lower()}, got {actual}")
    with atomic_directory(dest_dir) as tmp:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                targets = [_safe_member(m.filename, tmp, archive) for m in members]  # check all, then write
                for member, target in zip(members, targets, strict=True):
                    if member.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst, _BLOCK)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, EOFError) as exc:
            raise FetchError(f"{archive}: cannot unpack zip archive ({exc})") from exc
        (tmp / MARKER).write_text(actual + "\n")
    return dest_dir


def _one_line(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return " ".join(str(reason).split()) or type(exc).__name__


def _download(remote: RemoteDataset, target: Path, timeout: float) -> None:
    """Stream ``remote.url`` to ``target`` via a temp file in the same directory (renamed when complete)."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(remote.url, headers={"User-Agent": "ciess-prod data fetch"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                shutil.copyfileobj(response, out, _BLOCK)
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError/timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise FetchError(
            f"cannot download {remote.name} from {remote.url}: {_one_line(exc)} (no network?); "
            f"download it by hand to {target} and run `ciess data fetch {remote.name}` again"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch_dataset(name: str, dest: str | Path, timeout: float = 30.0) -> Path:
    """Make ``dest/<name>/`` hold the verified, unpacked dataset and return that directory.

    Nothing is downloaded when the directory is already verified, or when a matching archive (for instance one
    downloaded by hand) already sits at ``dest/<archive name>``.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets are {sorted(DATASETS)}")
    remote = DATASETS[name]
    dest = Path(dest)
    dataset_dir = dest / name
    if _is_verified(dataset_dir, remote.sha256):
        return dataset_dir
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / remote.archive_name
    if archive.is_file() and sha256_file(archive) == remote.sha256:
        return verify_and_unpack(archive, remote.sha256, dataset_dir)
    _download(remote, archive, timeout)
    try:
        return verify_and_unpack(archive, remote.sha256, dataset_dir)
    except FetchError:
        archive.unlink(missing_ok=True)  # a bad download must not be mistaken for a hand-placed archive
        raise
