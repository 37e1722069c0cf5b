"""Datasets, batching, augmentation and device feeding, offline first.

The data path has four stages, each a plain function:

* ``prepare(name)`` writes a dataset once as TFDS ``array_record`` files (only the
  ``grassq_fashion_mnist`` builder can be built offline; standard TFDS datasets are
  prepared on a machine with internet and copied, see docs/data.md);
* ``load_arrays(name, split)`` reads a whole split into numpy arrays on the host;
* ``train_batches`` / ``eval_batches`` turn a number of examples into index batches,
  deterministically and resumably;
* ``augment`` / ``normalize`` and the batch-level ``mixup_cutmix`` run on device inside the
  jitted step, and ``prefetch_to_device`` overlaps the host-to-device copies with compute.

Nothing here touches the network: every TFDS call passes ``download=False``, and a
missing dataset raises ``DatasetNotFoundError`` with instructions at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import queue
import sys
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

if __name__ == "__main__":
  # `python -m grassq.data ...`: run the CLI of the importable module, so the TFDS builder
  # is defined (and registered) once, under its package, which TFDS needs for its metadata.
  from grassq.data import main as _main
  sys.exit(_main())

# --------------------------------------------------------------------------------------
# Dataset specifications
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the model and the augmentation need to know about a dataset.

  ``mean`` and ``std`` are per channel, in [0, 1] pixel units (pixel / 255).
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int
  flip: bool
  train_split: str = "train"
  eval_split: str = "test"


DEFAULT_DATASET = "grassq_fashion_mnist"

_FASHION_MEAN, _FASHION_STD = (0.2860,), (0.3530,)
SPECS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("grassq_fashion_mnist", (28, 28, 1), 10, _FASHION_MEAN, _FASHION_STD, 2, True),
        DatasetSpec("fashion_mnist", (28, 28, 1), 10, _FASHION_MEAN, _FASHION_STD, 2, True),
        DatasetSpec("mnist", (28, 28, 1), 10, (0.1307,), (0.3081,), 2, False),
        # Horizontal flips would turn some digits into others: no flip for digits.
        DatasetSpec("digits", (28, 28, 1), 10, (0.3054,), (0.3247,), 2, False),
        DatasetSpec("cifar10", (32, 32, 3), 10, (0.4914, 0.4822, 0.4465),
                    (0.2470, 0.2435, 0.2616), 4, True),
        DatasetSpec("cifar100", (32, 32, 3), 100, (0.5071, 0.4865, 0.4409),
                    (0.2673, 0.2564, 0.2762), 4, True),
        DatasetSpec("imagenet2012", (224, 224, 3), 1000, (0.485, 0.456, 0.406),
                    (0.229, 0.224, 0.225), 0, True, eval_split="validation"),
    )
}

# Standard TFDS datasets that load_arrays reads from a prepared array_record copy.
_STANDARD_TFDS = ("fashion_mnist", "mnist", "cifar10", "cifar100")


def get_spec(name: str) -> DatasetSpec:
  """Returns the ``DatasetSpec`` of ``name``; ValueError listing the known names."""
  try:
    return SPECS[name]
  except KeyError:
    raise ValueError(
        f"Unknown dataset {name!r}; supported: {', '.join(sorted(SPECS))}") from None


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


class DatasetNotFoundError(FileNotFoundError):
  """A dataset (or its source files) is not on this machine; the message says how to get it."""


# --------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files: the offline TFDS builder
# --------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_HOWTO = (
    "Get the Fashion-MNIST IDX files in one of two ways:\n"
    "  * Debian/Ubuntu, as root: apt-get install dataset-fashion-mnist\n"
    f"    (installs them in {FASHION_MNIST_SYSTEM_DIR});\n"
    "  * or download the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,\n"
    "    t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from\n"
    "    https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a directory and\n"
    "    set GRASSQ_FASHION_MNIST_DIR=that/dir, or pass source_dir= / --source_dir."
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Parses a gzipped (or plain) IDX file of unsigned bytes into a numpy array.

  Raises ValueError naming the file when it is truncated, corrupt or not uint8 IDX.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path}: not a readable gzip file ({e})") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: bad IDX magic number {raw[:4]!r}")
  if raw[2] != 0x08:
    raise ValueError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  size = int(np.prod(dims))
  if len(raw) != header + size:
    raise ValueError(
        f"{path}: IDX dims {dims} need {header + size} bytes, file has {len(raw)} "
        "(truncated or corrupt)")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_fashion_mnist_split(source_dir: str | os.PathLike, split: str
                             ) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split from the IDX .gz files: images (N, 28, 28, 1) uint8, labels (N,) int32."""
  image_file, label_file = (os.path.join(source_dir, f) for f in _IDX_FILES[split])
  images, labels = read_idx(image_file), read_idx(label_file)
  if images.ndim != 3 or images.shape[1:] != (28, 28):
    raise ValueError(f"{image_file}: expected images of shape (N, 28, 28), got {images.shape}")
  if labels.ndim != 1:
    raise ValueError(f"{label_file}: expected labels of shape (N,), got {labels.shape}")
  if len(images) != len(labels):
    raise ValueError(f"{image_file} has {len(images)} images but {label_file} "
                     f"has {len(labels)} labels")
  if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
    raise ValueError(f"{label_file}: label {labels.max()} out of range 0..9")
  return images[..., None], labels.astype(np.int32)


def _missing_fashion_files(source_dir: str) -> list[str]:
  files = [f for pair in _IDX_FILES.values() for f in pair]
  return [f for f in files if not os.path.isfile(os.path.join(source_dir, f))]


def _check_fashion_source(source_dir: str) -> None:
  missing = _missing_fashion_files(source_dir)
  if missing:
    raise DatasetNotFoundError(
        f"Fashion-MNIST IDX files missing from {source_dir}: {', '.join(missing)}.\n"
        + _FASHION_HOWTO)


class GrassqFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Xiao et al. 2017) built offline from the IDX files.

  The source directory is, in order: the ``source_dir`` constructor argument,
  ``$GRASSQ_FASHION_MNIST_DIR``, the download config's ``manual_dir``, and
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
  Images are stored as raw uint8 tensors, so reading needs neither TensorFlow nor an
  image codec.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fashion-MNIST from the IDX files, raw uint8 tensors."}

  def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs: Any):
    self._source_dir = os.fspath(source_dir) if source_dir is not None else None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Fashion-MNIST, 60,000 train / 10,000 test 28x28 grey images, 10 classes.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        license="MIT",
        # Keep the IDX order: record i of a split is example i of the IDX file.
        disable_shuffling=True,
    )

  def source_dir(self, dl_manager=None) -> str:
    if self._source_dir is not None:
      return self._source_dir
    if os.environ.get("GRASSQ_FASHION_MNIST_DIR"):
      return os.environ["GRASSQ_FASHION_MNIST_DIR"]
    config = getattr(dl_manager, "download_config", None)
    if config is not None and config.manual_dir:
      return os.fspath(config.manual_dir)
    return FASHION_MNIST_SYSTEM_DIR

  def _split_generators(self, dl_manager):
    source_dir = self.source_dir(dl_manager)
    _check_fashion_source(source_dir)
    return {split: self._generate_examples(source_dir, split) for split in _IDX_FILES}

  def _generate_examples(self, source_dir: str, split: str):
    images, labels = read_fashion_mnist_split(source_dir, split)
    for i in range(len(images)):
      yield i, {"image": images[i], "label": int(labels[i])}


# --------------------------------------------------------------------------------------
# prepare / load_arrays
# --------------------------------------------------------------------------------------


def _standard_howto(name: str, data_dir: str) -> str:
  return (
      f"No prepared array_record copy of {name!r} under {data_dir}. This machine has no\n"
      "internet access, so prepare it on one that does (TensorFlow is needed there):\n"
      f"  pip install tensorflow tensorflow-datasets array_record\n"
      f"  tfds build {name} --file_format=array_record --data_dir=/some/dir\n"
      "or, in Python,\n"
      f"  tfds.builder({name!r}, data_dir='/some/dir').download_and_prepare(\n"
      "      file_format='array_record')\n"
      f"then copy /some/dir/{name} to {data_dir}/{name} here (or set TFDS_DATA_DIR)."
  )


def _prepared_version_dir(name: str, data_dir: str) -> str | None:
  """The newest ``data_dir/name/[config/]version`` directory holding array_record data."""
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    return None
  candidates = []
  for dirpath, _, filenames in os.walk(root):
    if "dataset_info.json" in filenames and any(".array_record" in f for f in filenames):
      candidates.append(dirpath)
  if not candidates:
    return None

  def version_key(path: str):
    try:
      return tuple(int(p) for p in os.path.basename(path).split("."))
    except ValueError:
      return ()
  return max(candidates, key=version_key)


def prepare(name: str = DEFAULT_DATASET, data_dir: str | os.PathLike | None = None,
            source_dir: str | os.PathLike | None = None) -> str:
  """Makes ``name`` available offline under ``data_dir``; idempotent and fast when done.

  Only ``grassq_fashion_mnist`` is built here (from the IDX files in ``source_dir``,
  ``$GRASSQ_FASHION_MNIST_DIR`` or /usr/share/datasets/fashion-mnist). ``digits`` needs
  nothing; the standard TFDS datasets are checked and must have been copied in.

  Returns:
    A one-line description of what was done.
  Raises:
    DatasetNotFoundError: the source files or the prepared copy are missing.
  """
  get_spec(name)
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  if name == "digits":
    return "digits: nothing to prepare (loaded from scikit-learn)"
  if name != "grassq_fashion_mnist":
    path = _prepared_version_dir(name, data_dir)
    if path is None:
      raise DatasetNotFoundError(_standard_howto(name, data_dir))
    return f"{name}: prepared copy found at {path}"

  builder = GrassqFashionMnist(data_dir=data_dir, file_format="array_record",
                               source_dir=source_dir)
  if builder.is_prepared():
    return f"{name}: already prepared at {builder.data_dir}"
  _check_fashion_source(builder.source_dir())
  start = time.perf_counter()
  builder.download_and_prepare()
  splits = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in _IDX_FILES)
  return (f"{name}: prepared {splits} examples from {builder.source_dir()} at "
          f"{builder.data_dir} in {time.perf_counter() - start:.1f} s")


_READ_CHUNK = 8192


def _read_data_source(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  n = len(source)
  images, labels = None, None
  for start in range(0, n, _READ_CHUNK):
    records = source.__getitems__(list(range(start, min(start + _READ_CHUNK, n))))
    if images is None:
      first = np.asarray(records[0]["image"])
      images = np.empty((n, *first.shape), np.uint8)
      labels = np.empty((n,), np.int32)
    images[start:start + len(records)] = np.stack([r["image"] for r in records])
    labels[start:start + len(records)] = [r["label"] for r in records]
  if images is None:
    raise ValueError(f"{name}/{split} under {data_dir} is empty")
  if images.ndim == 3:  # grey images decoded without a channel axis
    images = images[..., None]
  return images, labels


def load_digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits, resized bilinearly to 28x28x1 uint8; stratified 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = digits.images.astype(np.float64) * (255.0 / 16.0)  # values 0..16 -> 0..255
  # Separable bilinear interpolation with half-pixel centres and clamped edges.
  src = (np.arange(28) + 0.5) * (8 / 28) - 0.5
  lo = np.clip(np.floor(src).astype(int), 0, 7)
  hi = np.clip(lo + 1, 0, 7)
  frac = np.clip(src - lo, 0.0, 1.0)
  w = np.zeros((28, 8))
  np.add.at(w, (np.arange(28), lo), 1 - frac)
  np.add.at(w, (np.arange(28), hi), frac)
  x = np.einsum("ij,njk,lk->nil", w, x, w)
  images = np.clip(np.rint(x), 0, 255).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = train_test_split(
      np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
  idx = {"train": np.sort(train_idx), "test": np.sort(test_idx)}[split]
  return images[idx], labels[idx]


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split into host memory.

  Returns:
    images uint8 (N, H, W, C) and labels int32 (N,).
  Raises:
    ValueError: unknown dataset or split.
    DatasetNotFoundError: no prepared copy under ``data_dir`` (never waits on the network).
    NotImplementedError: imagenet2012, which is streamed rather than loaded.
  """
  spec = get_spec(name)
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  if name == "imagenet2012":
    raise NotImplementedError(
        "imagenet2012 (~150 GB of JPEGs) is meant to be streamed, not loaded into memory; a "
        "streaming loader is future work. See docs/data.md for how to prepare it.")
  if name == "digits":
    if split not in ("train", "test"):
      raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
    return load_digits_arrays(split)
  if _prepared_version_dir(name, data_dir) is None:
    if name == "grassq_fashion_mnist":
      raise DatasetNotFoundError(
          f"grassq_fashion_mnist is not prepared under {data_dir}; run\n"
          f"  python -m grassq.data prepare --data_dir {data_dir}\n"
          "(it reads the Fashion-MNIST IDX files).\n" + _FASHION_HOWTO)
    raise DatasetNotFoundError(_standard_howto(name, data_dir))
  images, labels = _read_data_source(name, split, data_dir)
  if images.shape[1:] != spec.image_shape:
    raise ValueError(f"{name}: images of shape {images.shape[1:]}, expected {spec.image_shape}")
  return images, labels


# --------------------------------------------------------------------------------------
# Batching: deterministic and resumable
# --------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  if batch_size <= 0 or num_examples < batch_size:
    raise ValueError(f"need 0 < batch_size <= num_examples, got batch_size={batch_size}, "
                     f"num_examples={num_examples}")
  return num_examples // batch_size


def train_batches(num_examples: int, batch_size: int, seed: int, start_step: int = 0
                  ) -> Iterator[np.ndarray]:
  """Infinite iterator of index batches (int64, shape (batch_size,)).

  Epoch ``e`` visits ``np.random.default_rng((seed, e)).permutation(num_examples)`` in
  full batches, dropping the remainder. Step ``s`` is batch ``s % steps_per_epoch`` of
  epoch ``s // steps_per_epoch``, so starting at ``start_step`` yields exactly the tail of
  the sequence that starts at 0: resuming from a checkpoint needs only the step.
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  step, epoch, perm = start_step, None, None
  while True:
    e, i = divmod(step, per_epoch)
    if e != epoch:
      epoch, perm = e, np.random.default_rng((seed, e)).permutation(num_examples)
    yield perm[i * batch_size:(i + 1) * batch_size]
    step += 1


def eval_batches(num_examples: int, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(indices, mask)`` covering 0..num_examples-1 in order, each of length batch_size.

  The last batch is padded with index 0 and ``mask`` False there, so every batch has the
  same shape (one compilation) and padded rows are easy to leave out of the metrics.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  for start in range(0, num_examples, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = idx < num_examples
    yield np.where(mask, idx, 0), mask


# --------------------------------------------------------------------------------------
# Augmentation on device
# --------------------------------------------------------------------------------------


def _augment_one(key: jax.Array, image: jax.Array, spec: DatasetSpec) -> jax.Array:
  """Random crop of the zero-padded image, then a random horizontal flip (if spec.flip)."""
  crop_key, flip_key = jax.random.split(key)
  p = spec.crop_padding
  if p > 0:
    h, w, c = image.shape
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
    image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
  if spec.flip:
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
  return image


def augment(rng: jax.Array, images: jax.Array, spec: DatasetSpec) -> jax.Array:
  """Per-example random crop (zero padding ``spec.crop_padding``) and flip; jit-able.

  Args:
    rng: a PRNG key; example i uses ``jax.random.split(rng, B)[i]``, so its result does
      not depend on the other examples or on how the batch is sharded.
    images: (B, H, W, C), uint8 or float; the dtype is kept.
    spec: the dataset's ``DatasetSpec``.
  """
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(lambda k, x: _augment_one(k, x, spec))(keys, images)


def mixup_cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with itself reversed.

  One mixing ratio lam per batch, as timm's default ("batch" mode): example i is mixed with
  example B-1-i. Mixup: x <- lam x + (1 - lam) x', lam ~ Beta(mixup_alpha, mixup_alpha).
  CutMix: a box of about (1 - lam) H W pixels of x' (lam ~ Beta(cutmix_alpha, cutmix_alpha),
  centre uniform, clipped at the border) replaces those of x, and lam becomes the exact fraction
  of x left. With both alphas > 0, CutMix is chosen with probability `switch_prob`. Targets are
  mixed with the same lam. Jit-able; the alphas are static.

  Args:
    rng: a PRNG key.
    images: (B, H, W, C) float images (mixing commutes with `normalize`).
    targets: (B, K) target distributions (one-hot, possibly smoothed).
    mixup_alpha: Beta parameter of Mixup; 0 disables it.
    cutmix_alpha: Beta parameter of CutMix; 0 disables it.
    switch_prob: probability of CutMix when both are enabled.

  Returns:
    (images, targets) mixed, with the input shapes and dtypes.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  mix_key, cut_key, box_key, switch_key = jax.random.split(rng, 4)
  _, h, w, _ = images.shape
  other = images[::-1]
  lam_mix = jax.random.beta(mix_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(cut_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  # The box: sides (H, W) * sqrt(1 - lam), centred at a uniform pixel, clipped to the image.
  ratio = jnp.sqrt(1.0 - lam_cut)
  half_h = jnp.floor(h * ratio).astype(jnp.int32) // 2
  half_w = jnp.floor(w * ratio).astype(jnp.int32) // 2
  cy, cx = jax.random.randint(box_key, (2,), 0, jnp.array([h, w]))
  y0, y1 = jnp.clip(cy - half_h, 0, h), jnp.clip(cy + half_h, 0, h)
  x0, x1 = jnp.clip(cx - half_w, 0, w), jnp.clip(cx + half_w, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  cut = jnp.where(box[None, :, :, None], other, images)
  mix = lam_mix * images + (1.0 - lam_mix) * other
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.bernoulli(switch_key, switch_prob)
    lam, mixed = jnp.where(use_cutmix, lam_box, lam_mix), jnp.where(use_cutmix, cut, mix)
  elif cutmix_alpha > 0:
    lam, mixed = lam_box, cut
  else:
    lam, mixed = lam_mix, mix
  mixed_targets = lam * targets + (1.0 - lam) * targets[::-1]
  return mixed.astype(images.dtype), mixed_targets.astype(targets.dtype)


def normalize(images: jax.Array, spec: DatasetSpec) -> jax.Array:
  """``(images / 255 - mean) / std`` in float32, per channel."""
  mean = jnp.asarray(spec.mean, jnp.float32)
  std = jnp.asarray(spec.std, jnp.float32)
  return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


# --------------------------------------------------------------------------------------
# Device feeding
# --------------------------------------------------------------------------------------

_END = object()


def prefetch_to_device(iterator, sharding: jax.sharding.Sharding, size: int = 2):
  """Moves host batches to devices in a background thread, ``size`` batches ahead.

  Each item of ``iterator`` is a pytree (usually a dict) of numpy arrays holding this
  process's part of the global batch (on a single host: the whole batch). Every leaf
  becomes a global ``jax.Array`` via ``jax.make_array_from_process_local_data(sharding,
  leaf)``, so the same code runs on one host or many. An exception raised by the source
  iterator (or the transfer) is re-raised in the consumer; closing the returned generator
  (or dropping it) stops the thread.
  """
  if size < 1:
    raise ValueError(f"size must be at least 1, got {size}")
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def to_device(x):
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  def worker():
    try:
      for batch in iterator:
        if not put((None, jax.tree.map(to_device, batch))):
          return
      put((_END, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((e, None))

  def consume():
    # The thread starts with the first `next`, so an iterator that is never used leaks nothing.
    thread = threading.Thread(target=worker, name="grassq-prefetch", daemon=True)
    thread.start()
    try:
      while True:
        status, batch = q.get()
        if status is _END:
          return
        if status is not None:
          raise status
        yield batch
    finally:
      stop.set()
      thread.join(timeout=5.0)

  return consume()


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m grassq.data", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="prepare a dataset offline (idempotent)")
  p.add_argument("--name", default=DEFAULT_DATASET, choices=sorted(SPECS))
  p.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
  p.add_argument("--source_dir", default=None,
                 help="Fashion-MNIST IDX files (default: $GRASSQ_FASHION_MNIST_DIR or "
                 f"{FASHION_MNIST_SYSTEM_DIR})")
  args = parser.parse_args(argv)
  try:
    print(prepare(args.name, data_dir=args.data_dir, source_dir=args.source_dir))
  except DatasetNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0

