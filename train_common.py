"""What the scripts share: safetensors read/write, atomic saves, distributed set-up, rank-0 printing and
progress bars, the guards of a run (user errors in one line, a lock on --out, the resume check, a stop at the
first non-finite loss, strict JSON logs, input checks), the LoRA baseline GIFT is compared with (in the scripts
and in bench.py), and one adapter interface (add, save, load, merge) over GIFT and LoRA."""
import contextlib
import functools
import hashlib
import json
import math
import mmap
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gift import _master_dtype, add_gift, gift_state_dict, load_gift_state_dict, merge_gift  # A, B: as Theta

# -----------------------------------------------------------------------------
# User errors: one line, exit status 2


class UserError(ValueError):
    """A mistake in the command line or in an input file. A script's main, decorated with @cli, prints it as one
    line `error: <message>` (what was found, what to do) and exits with status 2; anything else is a bug and
    keeps its traceback."""


def cli(main):
    """Decorates a script's main(argv): a UserError becomes one line on stderr and exit status 2."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            message = str(e)
            if "Original Traceback" in message:  # raised in a DataLoader worker: wrapped in the worker's traceback
                message = message.rstrip().rpartition("UserError: ")[2]
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    return run


# -----------------------------------------------------------------------------
# safetensors, atomic saves, distributed set-up

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
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
# The guards of a run: input files, --out, resuming, divergence, logs

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


_locks = {}  # realpath -> the open lock file: held until the process ends


def lock_out(out):
    """An exclusive lock on the folder out (creating it) for this process's lifetime: two runs writing one --out
    would race on its files. Taken by another process (the kernel drops a dead process's lock), a UserError
    naming it. Taking it again in the same process is a no-op."""
    import fcntl  # POSIX; imported here so that importing this module stays portable
    os.makedirs(out, exist_ok=True)
    key = os.path.realpath(out)
    if key in _locks:
        return
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{out} is in use by {holder}: wait for that run to end, or choose another --out") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _locks[key] = f


def check_ranges(args, minimum):
    """minimum: {argument: its least value}; an argument below it (None: not given) is a UserError."""
    for name, least in minimum.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least {least}")


def check_new_output(path, flag, inputs=None):
    """A UserError unless path (a file or a folder to be written) destroys nothing: it is none of inputs
    ({what: path}, e.g. {"the base model": ...}) and does not exist yet, or is an empty folder."""
    for what, i in (inputs or {}).items():
        if i and os.path.exists(path) and os.path.exists(i) and os.path.samefile(path, i):
            raise UserError(f"{flag} {path} is {what}: writing there would destroy it; choose a new path")
    if os.path.isfile(path):
        raise UserError(f"{flag} {path} exists: choose a new path (or delete it first)")
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if found:
        kind = "a checkpoint" if any(n.endswith((".pt", ".pth", ".safetensors", ".npz", ".bin")) or n in (
            "params.json", "config.json") for n in found) else "files"
        raise UserError(f"{flag} {path} holds {kind} ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): "
                        f"writing there would replace them; choose a new or empty folder")


def load_checkpoint(path, keys, device="cpu") -> dict:
    """A run's checkpoint (weights_only); a truncated, empty or foreign file is a UserError naming it."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a broken zip, pickle or storage each raise their own error
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read it ({why}); truncated? restore it, or remove it to start over") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a checkpoint of this script (no {', '.join(missing)}); remove it or choose "
                        f"another --out")
    return ckpt


def resume_checkpoint(path, resume, run, keys, device="cpu"):
    """The checkpoint a run continues from, or None when it starts anew. Without --resume an existing checkpoint
    is an error (it is never overwritten unasked); with it, the checkpoint must have been written by a run with
    the same settings and inputs: run holds this run's, the checkpoint's "run" the old ones."""
    if not os.path.exists(path):
        return None
    if not resume:
        raise UserError(f"{path} exists: add --resume to continue that run, or choose another --out")
    ckpt = load_checkpoint(path, [*keys, "run"], device)
    short = lambda v: (s if len(s := repr(v)) < 80 else s[:77] + "...")  # noqa: E731
    changed = [f"{k} {short(ckpt['run'][k]) if k in ckpt['run'] else '(not recorded)'} -> {short(run.get(k))}"
               for k in sorted(ckpt["run"].keys() | run.keys()) if ckpt["run"].get(k, ...) != run.get(k, ...)]
    if changed:
        raise UserError(f"{path} was written by a run with other settings or inputs ({'; '.join(changed)}): "
                        f"resume with the same ones, or start a new run in another --out")
    return ckpt


def check_finite(where, kept, **values):
    """Stops a diverged run at its first non-finite loss or gradient norm (values: numbers or 0-d tensors), before
    anything is saved over the last good checkpoint or written into the log. kept: what survives."""
    values = {k.replace("_", " "): float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
              for k, v in values.items()}
    bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
    if bad:
        raise UserError(f"{where}: {bad}; training stopped, {kept}. At the first step this points at non-finite "
                        f"weights in the model, later at a too large --lr")


def log_json(f, record):
    """Appends record to an open .jsonl log as one line of strict JSON (a NaN is an error, not `NaN`)."""
    f.write(json.dumps(record, allow_nan=False) + "\n")
    f.flush()


def trim_log(path, key, last):
    """Keeps the records of a .jsonl log with record[key] <= last, the ones the checkpoint holds (none for a
    new run): a resumed run then logs each step once. A line cut by a crash is dropped."""
    kept = []
    if last and os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            try:
                if json.loads(line)[key] <= last:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))


def adapter_config(path, script, required):
    """The run config a script wrote into an adapter's metadata ({"config": JSON, with "script"}); a file that is
    no adapter, or another script's, is a UserError saying so."""
    if not str(path).endswith(".safetensors"):
        raise UserError(f"{path}: not an adapter.safetensors (a run of {script} writes OUT/adapter.safetensors)")
    meta = read_safetensors_metadata(path)
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path}: no run config in its metadata; give an adapter.safetensors written by {script}") \
            from None
    other = config.get("script") or ("train_vit.py" if "vit" in config else script)  # older ViT ones: "vit"
    if other != script:
        raise UserError(f"{path} is an adapter of {other}, not of {script}; give one written by {script}")
    missing = [k for k in required if k not in config]
    if missing:
        raise UserError(f"{path}: its run config has no {', '.join(missing)}; give an adapter.safetensors "
                        f"written by {script}")
    return config


def check_vocab(tok, vocab_size, model, allow_padding=False):
    """The tokenizer must fit the model: as many ids as embedding rows (allow_padding: or fewer, for a model whose
    embedding is padded past its tokenizer), its special ids inside. Else a UserError naming both files."""
    special = {n: getattr(tok, n, None) for n in ("bos_id", "eos_id", "pad_id")}
    bad = [f"{n} {i}" for n, i in special.items() if i is not None and not 0 <= i < vocab_size]
    if bad or tok.n_words > vocab_size or (tok.n_words < vocab_size and not allow_padding):
        raise UserError(f"the tokenizer {tok.path} ({tok.n_words} ids{'; ' + ', '.join(bad) if bad else ''}) does "
                        f"not fit the model {model} ({vocab_size} embedding rows): give the model's own tokenizer")


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021), the baseline GIFT is compared with: W x + (alpha/r) B A x, frozen W, trainable A (r x d_in)
# and B (d_out x r). One implementation for every script and bench.py; gift.py stays GIFT-only.


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
