"""What the scripts share: safetensors read/write, atomic saves, distributed set-up, rank-0 printing and
progress bars, the LoRA baseline GIFT is compared with (in the scripts and in bench.py), and one adapter
interface (add, save, load, merge) over GIFT and LoRA."""
import json
import math
import mmap
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gift import add_gift, gift_state_dict, load_gift_state_dict, merge_gift

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
# LoRA (Hu et al. 2021), the baseline GIFT is compared with: W x + (alpha/r) B A x, frozen W, trainable A (r x d_in)
# and B (d_out x r). One implementation for every script and bench.py; gift.py stays GIFT-only.


def _master_dtype(dtype):
    """float64 for a float64 model, else float32: A and B are fp32 master weights beside bf16 ones (as Theta)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus (alpha/r) B A. weight and bias are the original Parameter objects under the same
    names, so the model's state_dict keeps its keys (plus .lora_A, .lora_B); the original module, emptied of
    them, sits in an unregistered tuple and merge_lora puts it back (the same scheme as gift.GIFTLinear)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        w = base.weight
        self.weight, self.bias = base.weight, base.bias
        del base.weight, base.bias
        self.in_features, self.out_features, self.scale = base.in_features, base.out_features, alpha / rank
        self.refs = (base,)
        master = dict(device=w.device, dtype=_master_dtype(w.dtype))
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **master))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **master))  # B = 0: step 0 is the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))                       # as nn.Linear, loralib and PEFT

    def forward(self, x):  # the scale multiplies the small (.., r) product, not the (.., d_out) one
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return F.linear(x, self.weight, self.bias) + ((x @ a.T) * self.scale) @ b.T  # (..,d_in)@(d_in,r)@(r,d_out)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}, " \
               f"scale={self.scale:g}"


def add_lora(model: nn.Module, targets, rank: int, alpha: float):
    """Freezes model and wraps every nn.Linear whose qualified name is a target or ends in "." + a target;
    returns the LoRA layers. A target that matches no nn.Linear is an error naming it."""
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = {t: [(n, m) for n, m in linear if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, hits in found.items() if not hits]
    if missing or not targets:
        raise ValueError(f"LoRA targets {missing or targets} matched no nn.Linear. Linear layers: "
                         f"{', '.join(n for n, _ in linear[:40]) or '(none)'}")
    for name, _ in (item for hits in found.values() for item in hits):
        if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
            raise ValueError(f"target {name!r} is inside nn.MultiheadAttention, which reads its weight directly "
                             f"instead of calling the layer, so LoRA cannot edit it")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for name, module in dict(item for hits in found.values() for item in hits).items():
        parent, _, leaf = name.rpartition(".")
        layers.append(LoRALinear(module, rank, alpha))
        setattr(model.get_submodule(parent), leaf, layers[-1])
    return layers


def lora_layers(model: nn.Module):
    """[(qualified name, LoRALinear)] in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Writes W + (alpha/r) B A into every LoRA layer and puts the plain nn.Linear back: the state_dict has the
    base model's keys again. The sum is computed in float32 (float64 for float64 weights) and cast once."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layer to merge (add_lora was not called, or it was merged already)")
    for name, layer in layers:
        acc = _master_dtype(layer.weight.dtype)
        delta = (layer.lora_B.to(acc) @ layer.lora_A.to(acc)) * layer.scale  # (d_out,r)@(r,d_in)
        layer.weight.copy_(layer.weight.to(acc) + delta)
        base = layer.refs[0]
        base.register_parameter("weight", layer.weight)  # the layer's current tensors (.to() may have replaced them)
        base.register_parameter("bias", layer.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, base)
    return model


# -----------------------------------------------------------------------------
# One adapter interface over GIFT and LoRA, for the scripts: a run config {"method", "targets", "rank", and
# "share" (GIFT) or "lora_alpha" (LoRA)} builds the adapter; its state (plus extra modules, e.g. a new head) is saved,
# loaded and merged the same way whatever the method.


def add_adapter(model: nn.Module, config: dict):
    """Freezes model and adds config's adapter; returns the number of trainable adapter parameters."""
    if config.get("method", "gift") == "lora":
        layers = add_lora(model, config["targets"], config["rank"], config["lora_alpha"])
        return sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers)
    if config.get("method", "gift") != "gift":
        raise ValueError(f"unknown adapter method {config['method']!r}: gift or lora")
    thetas = add_gift(model, config["targets"], config["rank"], config.get("share", "type"))
    return sum(p.numel() for p in thetas.parameters())


def adapter_state_dict(model: nn.Module, extra=()) -> dict:
    """The adapter's tensors (GIFT's Thetas, or every LoRA layer's A and B) plus the named extra submodules."""
    if hasattr(model, "gift"):
        return gift_state_dict(model, extra)
    if not lora_layers(model):
        raise ValueError("this model has no adapter (add_adapter was not called)")
    state = {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    for name in extra:
        state.update(model.get_submodule(name).state_dict(prefix=name + "."))
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict):
    """Loads what adapter_state_dict saved. Strict: every adapter tensor must be there, every key must exist in
    the model and every shape must match; anything else is an error naming the key."""
    if hasattr(model, "gift"):
        return load_gift_state_dict(model, state)
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k.endswith((".lora_A", ".lora_B")) and k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing keys {missing[:6]}, unexpected keys "
                         f"{unexpected[:6]} (were method, targets or rank different when it was saved?)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"adapter key {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                             f"(a different rank or layer size?)")
        own[k].copy_(v)


def merge_adapter(model: nn.Module) -> nn.Module:
    """merge_gift or merge_lora: plain nn.Linear layers with the adapted weights, the base model's keys."""
    return merge_gift(model) if hasattr(model, "gift") else merge_lora(model)
