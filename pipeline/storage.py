"""Run folders in object storage (s3://, gs://, abfs://, anything `pyarrow.fs` opens).

A run folder in a bucket is worked on through a *mirror*: a local copy on each machine, under
`$RETROFIT_MIRROR` (default `~/.cache/retrofit/mirror`), one folder per bucket location. The bucket is
the truth; the mirror only saves downloads. Before a stage runs its inputs are pulled; what it writes is
pushed, its manifest last (a manifest marks a stage complete, so it must never arrive before its files).
Workers on other nodes pull what they read and push what they write (SDG shards, training logs)
themselves, so the nodes share no folder. Credentials and endpoints come from the environment as each
file system reads them (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...);
Retrofit never logs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from pipeline.errors import RetrofitError

BLOCK = 8 << 20  # bytes per read/write when copying to or from a bucket


def is_remote(location: str | Path) -> bool:
    """True for a URI with a scheme other than file:// (a bucket)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def cache_dir() -> Path:
    """Retrofit's cache on this machine ($RETROFIT_CACHE, default ~/.cache/retrofit)."""
    root = Path(os.environ.get("RETROFIT_CACHE", Path.home() / ".cache" / "retrofit"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def open_location(uri: str):
    """(pyarrow file system, path inside it) for a bucket URI."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # an unknown scheme, or a file system this pyarrow was built without
        raise RetrofitError(f"{uri}: cannot open this location ({type(e).__name__}: {e})") from e


def _listing(fs, path: str) -> dict:
    """name under `path` -> FileInfo for every file at or under it ('' names `path` itself, when a file)."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return {"": info}
    if info.type == pafs.FileType.NotFound:
        return {}
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:]: i for i in found if i.type == pafs.FileType.File}


def mirror_root() -> Path:
    return Path(os.environ["RETROFIT_MIRROR"]) if os.environ.get("RETROFIT_MIRROR") else cache_dir() / "mirror"


class Mirror:
    """A bucket prefix and its local copy on this machine.

    Each synced file has a record (its remote size and modification time, its local size and
    modification time): a file is pulled when the bucket's copy changed since, pushed when the local
    copy did. Records are one small file each, written atomically, so processes on one machine may
    sync at once."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.base = open_location(self.uri)
        self.local = mirror_root() / self.folder_name(self.uri)
        self.local.mkdir(parents=True, exist_ok=True)
        (self.local / ".location").write_text(self.uri)  # which bucket this folder mirrors, for a reader

    @staticmethod
    def folder_name(uri: str) -> str:
        """The mirror's folder for a bucket location (the same on every machine)."""
        return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}".rstrip("/")

    def _record_path(self, rel: str) -> Path:
        return self.local / ".sync" / f"{rel}.json"

    def _record(self, rel: str) -> dict | None:
        p = self._record_path(rel)
        return json.loads(p.read_text()) if p.exists() else None

    def _save_record(self, rel: str, remote_info) -> None:
        local = self.local / rel
        st = local.stat()
        record = {"remote": [remote_info.size, remote_info.mtime_ns], "local": [st.st_size, st.st_mtime_ns]}
        p = self._record_path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, p)

    def _local_changed(self, rel: str, record: dict | None) -> bool:
        st = (self.local / rel).stat()
        return record is None or record["local"] != [st.st_size, st.st_mtime_ns]

    def files(self, rel: str) -> dict:
        """relative name -> FileInfo for every file at or under `rel` in the bucket."""
        return {f"{rel}/{name}".strip("/") if name else rel: info
                for name, info in _listing(self.fs, self._remote(rel)).items()}

    def pull(self, rel: str = "") -> int:
        """Bring the file or folder `rel` up to date from the bucket; local files the bucket does not have
        are removed (the bucket is the truth). Returns how many files were downloaded."""
        remote = self.files(rel)
        target = self.local / rel
        if not remote and target.is_file():
            target.unlink()
        if target.is_dir():
            for p in [q for q in target.rglob("*") if q.is_file() and not q.name.endswith(".tmp")]:
                name = str(p.relative_to(self.local))
                if name not in remote and not name.startswith("."):
                    p.unlink()
        pulled = 0
        for name, info in remote.items():
            record, local = self._record(name), self.local / name
            if (local.exists() and record is not None and record["remote"] == [info.size, info.mtime_ns]
                    and not self._local_changed(name, record)):
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
            with self.fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, BLOCK)
            os.replace(tmp, local)
            self._save_record(name, info)
            pulled += 1
        return pulled

    def push(self, rel: str = "", skip: tuple[str, ...] = ()) -> int:
        """Upload the file or folder `rel` where the local copy changed since it was last synced (files
        named in `skip` excepted). An upload appears whole or not at all. Returns how many were sent."""
        target = self.local / rel
        files = [target] if target.is_file() else sorted(q for q in target.rglob("*") if q.is_file()) \
            if target.is_dir() else []
        pushed = 0
        for p in files:
            name = str(p.relative_to(self.local))
            if p.name in skip or p.name.endswith(".tmp") or name.startswith(".") \
                    or not self._local_changed(name, self._record(name)):
                continue
            with open(p, "rb") as src, self.fs.open_output_stream(self._remote(name)) as dst:
                shutil.copyfileobj(src, dst, BLOCK)
            self._save_record(name, self.fs.get_file_info(self._remote(name)))
            pushed += 1
        return pushed

    def delete(self, rel: str) -> None:
        """Remove the file or folder `rel` from the bucket and from the mirror."""
        import pyarrow.fs as pafs

        path = self._remote(rel)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            self.fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        for local in (self.local / rel, self.local / ".sync" / rel):
            shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
        Path(f"{self.local / '.sync' / rel}.json").unlink(missing_ok=True)


class Folder:
    """A local folder or a bucket URI. `root` is always a local folder: the folder itself, or this
    machine's mirror of the bucket (which `pull` and `push` sync; for a local folder they do nothing)."""

    def __init__(self, location: str | Path):
        self.mirror = Mirror(str(location)) if is_remote(location) else None
        self.root = self.mirror.local if self.mirror else Path(location).resolve()
        self.location = self.mirror.uri if self.mirror else str(self.root)
        self.name = self.location.rstrip("/").rsplit("/", 1)[-1]
        self.root.mkdir(parents=True, exist_ok=True)

    def pull(self, rel: str) -> Path:
        """The local path of `rel` (a file or folder in here), brought up to date from the bucket."""
        if self.mirror:
            self.mirror.pull(rel)
        return self.root / rel

    def push(self, rel: str, skip: tuple[str, ...] = ()) -> None:
        """Send what changed under `rel` to the bucket."""
        if self.mirror:
            self.mirror.push(rel, skip)

    def describe(self, rel: str) -> str | None:
        """'12 files, 3.4 MiB' for what `rel` holds (in the bucket, for a mirror); None if nothing."""
        if self.mirror:
            sizes = [info.size for info in self.mirror.files(rel).values()]
        else:
            target = self.root / rel
            sizes = [p.stat().st_size for p in target.rglob("*") if p.is_file()] if target.is_dir() else []
        return f"{len(sizes)} files, {sum(sizes) / 2**20:.1f} MiB" if sizes else None

    def clear(self, rel: str) -> None:
        """Delete the file or folder `rel`, in the bucket too."""
        if self.mirror:
            self.mirror.delete(rel)
        target = self.root / rel
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def local_copy(location: str | Path) -> Path:
    """This machine's copy of the file or folder at `location` (a local path, or a bucket URI: then
    brought up to date first). Inside a bucket folder this machine already mirrors (a run folder), it is
    that mirror's copy: a model in a run folder is never downloaded twice."""
    if not is_remote(location):
        return Path(location)
    uri = str(location).rstrip("/")
    for marker in mirror_root().glob("*/.location"):
        parent = marker.read_text()
        if uri.startswith(parent + "/"):
            return Folder(parent).pull(uri[len(parent) + 1:])
    if "/" not in uri.partition("://")[2]:  # a whole bucket
        return Folder(uri).pull("")
    parent, name = uri.rsplit("/", 1)  # the parent's mirror holds it, whether a file or a folder
    return Folder(parent).pull(name)


def fingerprint_listing(location: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of every file at a bucket location, nothing downloaded: a cheap identity."""
    fs, base = open_location(location.rstrip("/"))
    return sorted((name or base.rsplit("/", 1)[-1], info.size, info.mtime_ns)
                  for name, info in _listing(fs, base).items())
