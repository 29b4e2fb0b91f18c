"""What train_vit.py and train_llama.py share: safetensors read/write, atomic saves, distributed set-up,
rank-0 printing and progress bars, and the LoRA baseline that bench.py measures GIFT against."""
import json
import math
import mmap
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

# -----------------------------------------------------------------------------
# safetensors, atomic saves, distributed set-up

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """{name: tensor} from a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian
    data (offsets relative to the end of the header). Every field is checked; errors name file and key."""
    if os.path.getsize(path) < 8:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes, too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:  # mapped, not read: pages load on demand and the tensors view them (copy on write)
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} does not fit in the file's {len(raw)} bytes "
                         f"(truncated, or not a safetensors file)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data = torch.frombuffer(raw, dtype=torch.uint8)
    data, size, spans, out = data[8 + n:], len(raw) - 8 - n, [], {}
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {key!r} has a malformed entry {info!r} (dtype must be one of "
                             f"{', '.join(_ST_DTYPES)}; data_offsets [begin, end])") from None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {key!r} has a bad shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size):
            raise ValueError(f"{path}: tensor {key!r} has data_offsets [{begin}, {end}] outside the "
                             f"{size} data bytes (truncated file?)")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"{path}: tensor {key!r} of {info['dtype']} {shape} needs "
                             f"{math.prod(shape) * itemsize} bytes, its data_offsets span {end - begin}")
        spans.append((begin, end, key))
        chunk = data[begin:end]
        if (8 + n + begin) % itemsize:  # .view(dtype) needs an aligned start: copy a rare unaligned tensor
            chunk = chunk.clone()
        out[key] = chunk.view(dtype).reshape(shape)
    pos = 0
    for begin, end, key in sorted(spans):  # the data must be covered exactly once, in any order
        if begin != pos:
            raise ValueError(f"{path}: tensor {key!r} starts at byte {begin}, expected {pos} "
                             f"({'overlapping' if begin < pos else 'a gap between'} tensors)")
        pos = end
    if pos != size:
        raise ValueError(f"{path}: the tensors cover {pos} of the {size} data bytes (trailing garbage?)")
    return out


def read_safetensors_metadata(path) -> dict:
    """The "__metadata__" {str: str} of a safetensors file ({} when absent); reads only the header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            return json.loads(f.read(n)).get("__metadata__") or {}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (bad header)") from None


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
    with open(str(path) + ".tmp", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for blob in blobs:
            f.write(blob)
    os.replace(str(path) + ".tmp", path)


def atomic_save(obj, path):
    """torch.save that never leaves a half-written file: write path.tmp, then rename over path."""
    torch.save(obj, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def setup_distributed():
    """(rank, world_size, local_rank, device). Joins the process group only when started by torchrun
    with more than one process: nccl on GPUs, gloo on CPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, local_rank, device


def print0(*args):
    """print on rank 0 only (every process runs the same code under torchrun)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def progress(iterable=None, **kwargs):
    """tqdm on stderr. In a terminal it redraws in place. Into a file or a pipe (a log, CI) every redraw stays,
    so there it shows up only after 10 s, redraws at most every 10 s, and ends its line when it closes: what
    is printed after the bar has closed (epoch records...) starts a line of its own."""
    if not sys.stderr.isatty():
        kwargs.update(delay=10, mininterval=10, leave=True)
    return tqdm(iterable, **kwargs)


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021), the minimal version: frozen W, trainable A (r x d_in) and B (d_out x r)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device))  # fp32 master weights
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device))  # B = 0: step 0 = base
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))                              # as nn.Linear, as PEFT

    def forward(self, x):  # the scale multiplies the small (.., r) product, not the (.., d_out) one
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base(x) + ((x @ a.T) * self.scale) @ b.T  # (..,d_in)@(d_in,r)@(r,d_out)


def add_lora(model: nn.Module, targets, rank: int, alpha: float):
    """Freezes model and wraps every nn.Linear whose name ends in a target; returns the LoRA layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent, _, leaf = name.rpartition(".")
            layers.append(LoRALinear(module, rank, alpha))
            setattr(model.get_submodule(parent), leaf, layers[-1])
    if not layers:
        raise ValueError(f"LoRA targets {targets} matched no nn.Linear")
    return layers
