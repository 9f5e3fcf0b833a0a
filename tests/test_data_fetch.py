"""Dataset download: offline verify/unpack on small zips, and clear one-line failures without a network."""

from __future__ import annotations

import hashlib
import io
import socket
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from ciess_prod.data import DATASETS, DataError, FetchError, fetch_dataset, load_movielens_1m
from ciess_prod.data import fetch as fetch_mod
from ciess_prod.data.fetch import verify_and_unpack

RATINGS = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"


def _make_zip(path: Path, members: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_known_datasets_are_pinned() -> None:
    assert set(DATASETS) == {"ml-1m", "ml-100k"}
    assert DATASETS["ml-1m"].url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert DATASETS["ml-100k"].url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    for remote in DATASETS.values():
        assert len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0
        assert remote.archive_name == f"{remote.name}.zip"


def test_verify_unpack_then_load(tmp_path: Path) -> None:
    archive = tmp_path / "ml-1m.zip"
    digest = _make_zip(archive, {"ml-1m/ratings.dat": RATINGS, "ml-1m/README": "readme"})
    out = verify_and_unpack(archive, digest, tmp_path / "data" / "ml-1m")
    assert out == tmp_path / "data" / "ml-1m"
    assert (out / "ml-1m" / "ratings.dat").read_text() == RATINGS
    log = load_movielens_1m(out)
    assert log.users.tolist() == [1, 1, 2] and log.items.tolist() == [1193, 661, 1193]
    assert _siblings(tmp_path / "data") == ["ml-1m"]  # no temp directories left behind
    # Re-running replaces the directory atomically and still leaves nothing else.
    (out / "stale.txt").write_text("old")
    verify_and_unpack(archive, digest.upper(), out)
    assert not (out / "stale.txt").exists()
    assert _siblings(tmp_path / "data") == ["ml-1m"]


def test_tampered_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "ml-1m.zip"
    digest = _make_zip(archive, {"ml-1m/ratings.dat": RATINGS})
    _make_zip(archive, {"ml-1m/ratings.dat": RATINGS + "3::1::1::1\n"})
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "ml-1m"
    with pytest.raises(FetchError) as info:
        verify_and_unpack(archive, digest, dest)
    message = str(info.value)
    assert "\n" not in message
    assert str(archive) in message and digest in message and actual in message
    assert "sha256 mismatch" in message
    assert not dest.exists()
    assert isinstance(info.value, DataError)


def test_path_traversal_is_refused(tmp_path: Path) -> None:
    for i, evil in enumerate(
        ("../escaped.txt", "/abs/escaped.txt", "ml-1m/../../escaped.txt", "..\\win.txt")
    ):
        work = tmp_path / f"case{i}"
        work.mkdir()
        archive = work / "evil.zip"
        digest = _make_zip(archive, {"ml-1m/ratings.dat": RATINGS, evil: "pwned"})
        dest = work / "out" / "ml-1m"
        with pytest.raises(FetchError, match=r"evil\.zip: refusing zip entry .* escapes the destination"):
            verify_and_unpack(archive, digest, dest)
        assert not dest.exists()
        assert not (work / "out").exists() or _siblings(work / "out") == []
        assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("win.txt"))


def test_unreadable_archive(tmp_path: Path) -> None:
    archive = tmp_path / "ml-1m.zip"
    archive.write_bytes(b"<html>proxy login</html>")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(FetchError, match=r"ml-1m\.zip: cannot unpack zip archive"):
        verify_and_unpack(archive, digest, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FetchError, match=r"missing\.zip: archive not found"):
        verify_and_unpack(tmp_path / "missing.zip", digest, tmp_path / "out")


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"unknown dataset 'ml-25m'; known datasets are \['ml-100k', 'ml-1m'\]"
    ):
        fetch_dataset("ml-25m", tmp_path)


def test_real_download_fails_cleanly_offline(tmp_path: Path) -> None:
    """This machine has no network: the real call must fail fast with one actionable line."""
    try:
        out = fetch_dataset("ml-100k", tmp_path, timeout=3.0)
    except FetchError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith("cannot download ml-100k from https://files.grouplens.org/")
        assert "(no network?)" in message and "ciess data fetch ml-100k" in message
        assert [p for p in tmp_path.iterdir()] == []  # no partial download left
    else:  # a machine with network: the real archive must verify
        assert (out / "ml-100k" / "u.data").is_file()


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
        TimeoutError("timed out"),
        OSError("The read operation timed out"),
        ConnectionResetError(104, "Connection reset by peer\nmulti-line detail"),
        urllib.error.HTTPError("https://x", 503, "Service Unavailable", {}, None),  # type: ignore[arg-type]
    ],
)
def test_download_errors_become_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(FetchError) as info:
        fetch_dataset("ml-1m", tmp_path, timeout=0.1)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download ml-1m from {DATASETS['ml-1m'].url}: ")
    assert "(no network?); download it by hand to" in message and str(tmp_path / "ml-1m.zip") in message
    assert list(tmp_path.iterdir()) == []


def _fake_remote(monkeypatch: pytest.MonkeyPatch, digest: str) -> None:
    remote = fetch_mod.RemoteDataset(
        name="ml-1m", url="https://example.invalid/ml-1m.zip", sha256=digest, size=0
    )
    monkeypatch.setitem(fetch_mod.DATASETS, "ml-1m", remote)


def test_fetch_with_mocked_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload_path = tmp_path / "payload.zip"
    digest = _make_zip(payload_path, {"ml-1m/ratings.dat": RATINGS})
    payload = payload_path.read_bytes()
    _fake_remote(monkeypatch, digest)
    calls: list[float] = []

    def serve(request: urllib.request.Request, timeout: float) -> io.BytesIO:
        calls.append(timeout)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    dest = tmp_path / "cache"
    out = fetch_dataset("ml-1m", dest, timeout=7.0)
    assert out == dest / "ml-1m" and calls == [7.0]
    assert load_movielens_1m(out).users.tolist() == [1, 1, 2]
    assert sorted(p.name for p in dest.iterdir()) == ["ml-1m", "ml-1m.zip"]
    # Already present and verified: no second download.
    assert fetch_dataset("ml-1m", dest) == out and calls == [7.0]


def test_fetch_tampered_download_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.zip"
    digest = _make_zip(good, {"ml-1m/ratings.dat": RATINGS})
    _fake_remote(monkeypatch, digest)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"truncated"))
    dest = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"ml-1m\.zip: sha256 mismatch: expected " + digest):
        fetch_dataset("ml-1m", dest)
    assert list(dest.iterdir()) == []


def test_fetch_uses_hand_downloaded_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "cache"
    dest.mkdir()
    digest = _make_zip(dest / "ml-1m.zip", {"ml-1m/ratings.dat": RATINGS})
    _fake_remote(monkeypatch, digest)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not download when a verified archive is present")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    out = fetch_dataset("ml-1m", dest)
    assert load_movielens_1m(out).items.tolist() == [1193, 661, 1193]
