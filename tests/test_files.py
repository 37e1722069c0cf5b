"""grassq.files: atomic writes, checked JSON reads, content hashes, remote paths kept intact."""

import os
import pathlib

import pytest

from grassq import files


def _listing(d):
  return sorted(os.listdir(d))


def test_atomic_write_replaces_the_file_and_leaves_no_temporaries(tmp_path):
  path = str(tmp_path / "sub" / "a.txt")  # the directory is made
  files.atomic_write(path, "old")
  files.atomic_write(path, b"new\x00bytes")
  assert open(path, "rb").read() == b"new\x00bytes"
  assert _listing(tmp_path / "sub") == ["a.txt"]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
  path = str(tmp_path / "a.json")
  files.write_json(path, {"v": 1})
  with pytest.raises(RuntimeError, match="killed"):
    with files.atomic_path(path, ".json") as tmp:
      with open(tmp, "w") as f:
        f.write('{"v": ')  # half written when the writer dies
      raise RuntimeError("killed")
  assert files.read_json(path) == {"v": 1}

  def refuse(*_):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", refuse)  # the rename itself fails
  with pytest.raises(OSError, match="disk full"):
    files.write_json(path, {"v": 2})
  monkeypatch.undo()
  assert files.read_json(path) == {"v": 1}
  assert _listing(tmp_path) == ["a.json"]


def test_read_json_names_the_file_and_the_remedy(tmp_path):
  path = str(tmp_path / "cache.json")
  files.write_json(path, {"key": [1, 2], "value": "x"}, indent=1)
  assert files.read_json(path) == {"key": [1, 2], "value": "x"}
  text = open(path).read()
  with open(path, "w") as f:
    f.write(text[:len(text) // 2])  # torn by a kill
  with pytest.raises(files.CorruptFileError, match="truncated or damaged") as e:
    files.read_json(path, "stage cache", "delete it to recompute it")
  msg = str(e.value)
  assert msg.startswith(f"stage cache {path} is not valid JSON") and "delete it" in msg
  assert isinstance(e.value, ValueError)  # callers catching ValueError keep working
  with pytest.raises(FileNotFoundError):  # a missing file is not a damaged one
    files.read_json(str(tmp_path / "missing.json"))


def test_read_json_refuses_bytes_that_are_not_utf8(tmp_path):
  path = str(tmp_path / "cache.json")
  with open(path, "wb") as f:
    f.write(b"\xff\xfe{")
  with pytest.raises(files.CorruptFileError, match="cache.json"):
    files.read_json(path)


def test_atomic_write_gives_the_umask_permissions(tmp_path):
  path = str(tmp_path / "table.md")
  files.atomic_write(path, "| a |\n")
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_atomic_dir_replaces_a_directory_whole(tmp_path):
  path = str(tmp_path / "prog")
  with files.atomic_dir(path) as d:
    files.atomic_write(os.path.join(d, "a"), "1")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    with files.atomic_dir(path):
      pass
  with pytest.raises(RuntimeError):
    with files.atomic_dir(path, overwrite=True) as d:
      files.atomic_write(os.path.join(d, "b"), "2")
      raise RuntimeError("killed")
  assert _listing(path) == ["a"] and _listing(tmp_path) == ["prog"]  # old one kept, no temp
  with files.atomic_dir(path, overwrite=True) as d:
    files.atomic_write(os.path.join(d, "b"), "2")
  assert _listing(path) == ["b"] and _listing(tmp_path) == ["prog"]


def test_checksum_refuses_a_modified_truncated_or_unrecorded_file(tmp_path):
  import hashlib

  path = str(tmp_path / "m.so")
  data = bytes(range(256)) * 64
  files.atomic_write(path, data)
  digest = files.write_checksum(path)
  assert digest == hashlib.sha256(data).hexdigest()
  assert open(path + files.CHECKSUM_SUFFIX).read() == f"{digest}  m.so\n"  # as sha256sum
  files.verify_checksum(path, "compiled module")
  for damaged in (data[:len(data) // 10], data[:100] + bytes([data[100] ^ 1]) + data[101:]):
    with open(path, "wb") as f:
      f.write(damaged)
    with pytest.raises(files.CorruptFileError, match="does not match its recorded SHA-256"):
      files.verify_checksum(path, "compiled module")
  with open(path + files.CHECKSUM_SUFFIX, "w") as f:
    f.write("not a digest\n")
  with pytest.raises(files.CorruptFileError, match="damaged"):
    files.verify_checksum(path)
  os.remove(path + files.CHECKSUM_SUFFIX)
  with pytest.raises(files.CorruptFileError, match="no checksum file"):
    files.verify_checksum(path)


def test_abspath_and_join_keep_remote_urls_intact(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert files.abspath("gs://bucket/run/") == "gs://bucket/run"  # not /cwd/gs:/bucket/run
  assert files.abspath("s3://b/x") == "s3://b/x"
  assert files.abspath("run") == str(tmp_path / "run")
  assert files.abspath("file:///tmp/x") == "/tmp/x"
  assert files.is_remote("gs://b") and not files.is_remote("/tmp/gs:/b")
  assert not files.is_remote("file:///tmp/x")
  assert files.join("gs://bucket/run/", "runs", "/w8a8.json") == "gs://bucket/run/runs/w8a8.json"
  assert files.join("/a", "b", "c") == os.path.join("/a", "b", "c")


def test_remote_paths_are_written_whole_through_epath(tmp_path, monkeypatch):
  """The remote branch (gs:// in production) on a stand-in for `etils.epath` that maps URLs to
  local paths: the object is uploaded only after its writer finished."""
  store = tmp_path / "store"
  monkeypatch.setattr(files, "_epath", lambda url: pathlib.Path(store, url.split("://", 1)[1]))
  url = "gs://bucket/run/metrics.json"
  files.write_json(url, {"step": 3})
  assert (store / "bucket" / "run" / "metrics.json").exists()
  assert files.exists(url) and files.read_json(url) == {"step": 3}
  with pytest.raises(RuntimeError):
    with files.atomic_path(url) as tmp:
      with open(tmp, "w") as f:
        f.write("{")
      raise RuntimeError("killed")
  assert files.read_json(url) == {"step": 3}  # nothing was uploaded
  files.write_checksum(url)
  files.verify_checksum(url)
  (store / "bucket" / "run" / "metrics.json").write_text('{"step": 4}\n')
  with pytest.raises(files.CorruptFileError, match="gs://bucket/run/metrics.json"):
    files.verify_checksum(url)
  with files.atomic_dir("gs://bucket/prog") as d:  # no rename on an object store: in place
    assert d == "gs://bucket/prog"
    files.atomic_write(files.join(d, "program.json"), "{}")
  assert files.read_json("gs://bucket/prog/program.json") == {}
