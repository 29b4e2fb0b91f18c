"""The files the scripts read and write: safetensors (read with every field checked, written atomically), atomic
saves of anything, JSON and UTF-8 text read with errors that name the file, and content fingerprints of inputs.
UserError lives here, the lowest layer, so that every reader can raise it; harness.cli prints it as one line."""
import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import shutil
from pathlib import Path

import torch


class UserError(ValueError):
    """A mistake in the command line or in an input file. A script's main, decorated with @cli, prints it as one
    line `error: <message>` (what was found, what to do) and exits with status 2; anything else is a bug and
    keeps its traceback."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """{name: tensor} from a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian
    data (offsets relative to the end of the header). Every field is checked; errors name file and key."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if os.path.getsize(path) < 8:
        raise UserError(f"{path}: {os.path.getsize(path)} bytes, too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:  # mapped, not read: pages load on demand and the tensors view them (copy on write)
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or 8 + n > len(raw):
        raise UserError(f"{path}: header length {n} does not fit in the file's {len(raw)} bytes "
                        f"(truncated, or not a safetensors file)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data = torch.frombuffer(raw, dtype=torch.uint8)
    data, size, spans, out = data[8 + n:], len(raw) - 8 - n, [], {}
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {key!r} has a malformed entry {info!r} (dtype must be one of "
                            f"{', '.join(_ST_DTYPES)}; data_offsets [begin, end])") from None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise UserError(f"{path}: tensor {key!r} has a bad shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size):
            raise UserError(f"{path}: tensor {key!r} has data_offsets [{begin}, {end}] outside the "
                            f"{size} data bytes (truncated file?)")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize:
            raise UserError(f"{path}: tensor {key!r} of {info['dtype']} {shape} needs "
                            f"{math.prod(shape) * itemsize} bytes, its data_offsets span {end - begin}")
        spans.append((begin, end, key))
        chunk = data[begin:end]
        if (8 + n + begin) % itemsize:  # .view(dtype) needs an aligned start: copy a rare unaligned tensor
            chunk = chunk.clone()
        out[key] = chunk.view(dtype).reshape(shape)
    pos = 0
    for begin, end, key in sorted(spans):  # the data must be covered exactly once, in any order
        if begin != pos:
            raise UserError(f"{path}: tensor {key!r} starts at byte {begin}, expected {pos} "
                            f"({'overlapping' if begin < pos else 'a gap between'} tensors)")
        pos = end
    if pos != size:
        raise UserError(f"{path}: the tensors cover {pos} of the {size} data bytes (trailing garbage?)")
    return out


def check_float(path, tensors: dict, allowed=()) -> dict:
    """Model weights must be floating point: a tensor whose file says I32 (or any integer or bool type) where a
    weight belongs would be read as integers and trained on, silently wrong. allowed: keys (or key suffixes)
    that are integers by design (BERT's position_ids). Returns tensors; else a UserError naming file and key."""
    for key, t in tensors.items():
        if not (t.is_floating_point() or key.endswith(tuple(allowed))):
            raise UserError(f"{path}: tensor {key!r} is stored as {t.dtype}, but a model weight is floating point "
                            f"(F32, F16, BF16); the file is damaged or not this model's")
    return tensors


def read_safetensors_metadata(path) -> dict:
    """The "__metadata__" {str: str} of a safetensors file ({} when absent); reads only the header."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= os.path.getsize(path) - 8:  # a zip or a pickle read as a length: petabytes
            raise UserError(f"{path}: not a safetensors file (its header length {n} does not fit in the file)")
        try:
            return json.loads(f.read(n)).get("__metadata__") or {}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise UserError(f"{path}: not a safetensors file (bad header)") from None


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Writes {name: tensor} in the safetensors format (readable by read_safetensors and `safetensors`)."""
    header, blobs, pos = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    inverse = {v: k for k, v in _ST_DTYPES.items()}
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": inverse[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(blob)]}
        blobs.append(blob)
        pos += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so that the data starts 8-byte aligned

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for blob in blobs:
                f.write(blob)
    atomic_write(path, write)


def atomic_write(path, write):
    """write(tmp) writes what path is to hold (a file, or a folder) into tmp, a temporary sibling renamed to path
    once complete: an interruption never leaves a half-written path. A failed write (a full disk...) removes tmp
    and is a UserError naming path; a previous path is left as it was."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two writers never share it
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # an interruption too: no temporary file is left behind
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        kept = "; the previous one is kept" if os.path.exists(path) else ""
        raise UserError(f"could not write {path}: {(e.strerror or str(e)).lower()}{kept}") from None


def atomic_save(obj, path):
    """torch.save that never leaves a half-written file (atomic_write)."""
    def save(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
            if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                raise
            why = str(e).rpartition("] ")[2].strip(" .")
            raise OSError(errno.EIO, f"torch.save failed ({why}); is the disk full?") from None
    atomic_write(path, save)


@contextlib.contextmanager
def utf8_text(path):
    """Reading the text file path inside this block: content that is not UTF-8 is a UserError naming it."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def read_json(path):
    """A JSON file's content; a missing, non-UTF-8 or malformed file is a UserError naming it. A dict comes back
    as a dict whose missing keys are a UserError naming the file and the key (a config lacking a field)."""
    try:
        with utf8_text(path):
            data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return _Fields(path, data) if isinstance(data, dict) else data


class _Fields(dict):
    def __init__(self, path, data):
        super().__init__(data)
        self.path = path

    def __missing__(self, key):
        raise UserError(f"{self.path}: no field {key!r}")


def fingerprint(path, limit=1 << 28) -> str:
    """A short hash of the content of a file, or of a folder's files (not of their location: a moved or copied
    input is the same input): names and sizes, and the bytes of every file up to limit bytes (larger ones, model
    weights, by size only, which keeps this fast)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name if p != path else ''}\0{size}\0".encode())
        if size <= limit:
            with open(p, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]
