"""Every file grassq writes and reads back: atomic writes, checked reads, content hashes.

One writer serves the whole package (runs, metrics, integer programs, compiled modules, stage
caches, tables and plots), so a kill at any moment leaves either the old file or the new one,
never half of one:

* local paths: the data goes to a temporary file in the same directory, is flushed and
  fsync'ed, and is renamed onto the target (``os.replace``, atomic on POSIX filesystems); the
  directory is fsync'ed after the rename so the new name survives a machine crash too.
* remote paths (``gs://bucket/run``, any scheme `etils.epath` reads; GCS needs ``gcsfs``):
  the object is uploaded whole, and object stores publish an object only when its upload
  completes, which is the same guarantee. Remote paths are passed through untouched
  (`abspath` does not turn ``gs://b/run`` into ``/cwd/gs:/b/run``).

Reading back: `read_json` names the file and says what to do when it cannot be parsed (a bare
``JSONDecodeError`` names neither), and `write_checksum` / `verify_checksum` keep a SHA-256 of
a file beside it, for files that are mapped or executed on load (compiled TVM modules).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

CHECKSUM_SUFFIX = ".sha256"


class CorruptFileError(ValueError):
  """A file grassq wrote cannot be read back: truncated, edited or damaged."""


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs with a scheme other than ``file`` (``gs://``, ``s3://``, ...)."""
  p = os.fspath(path)
  return "://" in p and not p.startswith("file://")


def abspath(path: str | os.PathLike) -> str:
  """An absolute local path, or a remote URL unchanged."""
  p = os.fspath(path)
  if is_remote(p):
    return p.rstrip("/")
  if p.startswith("file://"):
    p = p[len("file://"):]
  return os.path.abspath(p)


def join(path: str, *parts: str) -> str:
  """`os.path.join` that keeps remote URLs intact."""
  if is_remote(path):
    return "/".join([path.rstrip("/"), *(q.strip("/") for q in parts)])
  return os.path.join(path, *parts)


def _epath(path: str):
  from etils import epath

  return epath.Path(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def _umask() -> int:
  """The process umask, read without changing it where Linux allows (os.umask can only be read
  by setting it, which races with other threads creating files)."""
  with contextlib.suppress(OSError, ValueError):
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _fsync_dir(path: str) -> None:
  with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a local temporary file name; when the block ends without an exception the file is
  published at `path` (renamed there, or uploaded for a remote path), else removed.

  For writers that want a file name (a compiled library's ``export_library``, ``savefig``).
  """
  remote = is_remote(path)
  path = abspath(path)
  parent = tempfile.gettempdir() if remote else os.path.dirname(path)
  if not remote:
    os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=".grassq-tmp-", suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    if remote:
      _epath(path).parent.mkdir(parents=True, exist_ok=True)
      with open(tmp, "rb") as src, _epath(path).open("wb") as dst:
        shutil.copyfileobj(src, dst)
    else:
      with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
      # mkstemp makes 0600 files; give the published one what open() would have (0666 & ~umask)
      os.chmod(tmp, 0o666 & ~_umask())
      os.replace(tmp, path)
      _fsync_dir(parent)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` (text is UTF-8 encoded) to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """`obj` as JSON (indent 2 unless given) written atomically."""
  dump_kwargs.setdefault("indent", 2)
  atomic_write(path, json.dumps(obj, **dump_kwargs) + "\n")


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return _epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  """The file's text (UTF-8)."""
  return read_bytes(path).decode()


def read_json(path: str, what: str = "file", remedy: str = "") -> Any:
  """Parses JSON file `path`; a file that is not valid JSON raises `CorruptFileError` naming
  it, `what` it is and the `remedy` (e.g. "delete it to recompute it")."""
  data = read_bytes(path)
  try:
    return json.loads(data.decode())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    msg = f"{what} {path} is not valid JSON ({e}); it was truncated or damaged"
    raise CorruptFileError(msg + (f": {remedy}" if remedy else "")) from None


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a directory to fill; on success it replaces `path` as a whole (local paths: one
  rename, the old directory removed after). A remote directory cannot be renamed: the block
  writes into `path` itself, and its readers must look for a file written last (a marker).
  """
  if exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  if is_remote(path):
    makedirs(path)
    yield path
    return
  path = abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".grassq-tmp-")
  try:
    yield tmp
    if os.path.exists(path):
      old = tmp + "-old"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
    _fsync_dir(parent)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def sha256(path: str) -> str:
  """Hex SHA-256 of a file's bytes."""
  h = hashlib.sha256()
  opener = _epath(path).open if is_remote(path) else lambda mode: open(path, mode)
  with opener("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_checksum(path: str) -> str:
  """Writes ``path + CHECKSUM_SUFFIX`` ("<sha256>  <name>", as sha256sum does); returns it."""
  digest = sha256(path)
  atomic_write(path + CHECKSUM_SUFFIX, f"{digest}  {os.path.basename(path)}\n")
  return digest


def verify_checksum(path: str, what: str = "file") -> None:
  """Raises `CorruptFileError` unless `path` has the SHA-256 recorded beside it by
  `write_checksum` (a missing record is refused too: nothing unverified is used)."""
  record = path + CHECKSUM_SUFFIX
  if not exists(record):
    raise CorruptFileError(f"{what} {path} has no checksum file {record}: it was not written "
                           "by grassq (or the checksum was lost); save it again")
  text = read_text(record).split()
  if not text or len(text[0]) != 64:
    raise CorruptFileError(f"checksum file {record} is damaged; save the {what} again")
  if sha256(path) != text[0]:
    raise CorruptFileError(f"{what} {path} does not match its recorded SHA-256 ({record}): it "
                           "was truncated or modified after it was saved; save it again")
