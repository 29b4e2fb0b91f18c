"""The run harness every script shares, written once: the command line's one-line `error:` (cli) and its common
flags, the device and torchrun set-up, rank-0 printing and progress bars, the input guards, and the lifecycle
of a training run in its --out folder (Run): a lock on the folder, resume only with the same settings and inputs,
atomic checkpoints, a strict JSON log, a stop at the first non-finite loss, Ctrl-C and SIGTERM that finish the
step and save it, and the final adapter file with its run config. Also one adapter interface over GIFT and LoRA
(add_adapter, adapter_state_dict, load_adapter_state_dict, merge_adapter) for loading saved adapter files.

A training loop on it (see train_*.py for the real ones):

    run = Run(args.out, settings, keys=("adapter", "optimizer", "step"), resume=args.resume, rank=rank)
    start = run.checkpoint["step"] if run.checkpoint else 0
    with run.catch_signals():
        for step in range(start, total):
            ...; run.check_finite(f"step {step + 1}", loss=loss); opt.step()
            run.log({"step": step + 1, "loss": loss.item()})
            if run.should_stop():                      # Ctrl-C / SIGTERM: this step is done; save it and stop
                break
    run.save({"adapter": ..., "optimizer": opt.state_dict(), "step": step + 1}, step + 1)
"""
import argparse
import contextlib
import errno
import functools
import gc
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from fileio import UserError, atomic_save, atomic_write, read_safetensors_metadata, write_safetensors
from gift import add_gift, gift_state_dict, load_gift_state_dict, merge_gift
from lora import add_lora, load_lora_state_dict, lora_state_dict, merge_lora

# -----------------------------------------------------------------------------
# The command line: one `error:` line for a user's mistake, one dialect of flags

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each default and keeps the description's line breaks (the run commands)."""


def add_common_flags(p, *, targets, gift_rank, lora_rank, lora_alpha, out, precision="fp32"):
    """The flags every script shares, with the same names, meanings and help: the adapter (--method, --targets,
    --rank, --share, --lora-alpha; --adapter, --merge, --eval-only) and the run (--out, --resume, --stop-after,
    --seed, --device, --precision, --compile, --demo). The arguments are the script's defaults."""
    a = p.add_argument_group("the adapter")
    a.add_argument("--method", choices=["gift", "lora"], default="gift", help="GIFT, or the LoRA baseline")
    a.add_argument("--targets", nargs="+", default=targets, help="adapted Linear layers, by name suffix")
    a.add_argument("--rank", type=int, help=f"rank r; None: {gift_rank} for GIFT, {lora_rank} for LoRA (the paper's)")
    a.add_argument("--share", choices=["type", "all"], default="type",
                   help="GIFT: one Theta per target (the paper's), or one for all")
    a.add_argument("--lora-alpha", type=float, default=lora_alpha, help="LoRA: the update is (alpha/r) B A")
    a.add_argument("--adapter", metavar="FILE", help="an adapter.safetensors of this script: evaluated with "
                   "--eval-only, merged with --merge, else the start of the run")
    a.add_argument("--merge", metavar="OUT", help="write --adapter merged into its base model to OUT and exit")
    a.add_argument("--eval-only", action="store_true", help="evaluate (--adapter, or the base model zero-shot) "
                   "without training")
    r = p.add_argument_group("the run")
    r.add_argument("--out", help=f"the run's folder: checkpoint.pt, log.jsonl, adapter.safetensors, results; "
                   f"None: {out} (--demo: a temporary folder)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same settings, inputs)")
    r.add_argument("--overwrite", action="store_true", help="start anew in an --out that holds a run, replacing it")
    r.add_argument("--stop-after", type=int, metavar="N", help="save and stop after N steps (continue: --resume)")
    r.add_argument("--seed", type=int, default=42, help="initialisation and data order")
    r.add_argument("--device", type=parse_device, help="cpu, cuda or cuda:N; None: CUDA when available (under "
                   "torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--precision", choices=["fp32", "bf16"], default=precision,
                   help="fp32, or bf16" + ("; None: bf16 on a GPU, fp32 on a CPU" if precision is None else ""))
    r.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the adapted model (GPUs: faster steps after a compile of a minute or so; CPUs "
                   "need a C++ compiler). MODE: default; reduce-overhead: also CUDA graphs, for steps of fixed "
                   "shapes (train_vit.py's); max-autotune: also searches kernels (slow to compile)")
    r.add_argument("--demo", action="store_true", help="generated model and data, then the whole pipeline: "
                   "under a minute on a CPU")
    return p


def parse_device(text):
    """--device: 'cpu', 'cuda' or 'cuda:N' (argparse turns the ValueError into a one-line error)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: this script runs on cpu or cuda")
    return device


def check_ranges(args, minimum):
    """minimum: {argument: its least value}; an argument below it (None: not given) is a UserError."""
    for name, least in minimum.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least {least}")


# -----------------------------------------------------------------------------
# Devices, torchrun, printing

def setup_distributed(device=None):
    """(rank, world_size, local_rank, device) for --device (None: CUDA when available). Joins the process group
    only when started by torchrun with more than one process: nccl on GPUs, gloo on the CPU. On CUDA each process
    takes cuda:LOCAL_RANK unless a cuda:N is given; more processes than GPUs is a UserError."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: torch sees no CUDA GPU here (CPU build, or no driver); "
                            f"use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"{device}: this machine has {torch.cuda.device_count()} GPU(s); start at most that many "
                            f"processes per node (torchrun --nproc_per_node), or give --device cpu")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, local_rank, device


def fused_adamw(params, **kwargs):
    """torch.optim.AdamW, fused into one kernel per step on CUDA (many small launches fewer); else the default."""
    params = list(params)
    fused = all(p.is_cuda for group in params for p in (group["params"] if isinstance(group, dict) else [group]))
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes of the inductor backend


def compile_model(model, mode="default"):
    """--compile MODE: torch.compile(model, mode=MODE). GIFT_COMPILE_BACKEND picks another backend, e.g. aot_eager,
    which needs no C++ compiler (the CPU tests use it) and takes no mode. reduce-overhead records each input shape's
    step as a CUDA graph (on a GPU; elsewhere it is the default mode) and replays it with one launch: one graph
    for a fixed-shape loop, one more per new shape. A replay overwrites the previous one's outputs, so every call
    first marks a new step (torch.compiler.cudagraph_mark_step_begin): a loop must use the loss before the next
    forward (each micro-batch's backward does)."""
    backend = os.environ.get("GIFT_COMPILE_BACKEND", "inductor")
    if backend != "inductor":
        return torch.compile(model, backend=backend)
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    if mode == "reduce-overhead":  # a hook of the compiled wrapper runs eagerly, before each graph's replay
        compiled.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
    return compiled


def close_distributed():
    """Leaves the process group (if any) once every rank got here: nobody tears it down while another rank still
    talks (gloo aborts). Drop DDP wrappers before: their Reducer holds the group, and a wrapper left in a
    reference cycle is collected here, not after the group is gone."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


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
# The guards of a run: --out, resuming, divergence, logs, adapter files, tokenizers


_locks = {}  # realpath -> the open lock file: held until the process ends


def lock_out(out):
    """An exclusive lock on the folder out (creating it) for this process's lifetime: two runs writing one --out
    would race on its files. Taken by another process (the kernel drops a dead process's lock), a UserError
    naming it. Taking it again in the same process is a no-op. A POSIX record lock (lockf), not flock: forked
    processes (DataLoader workers) do not inherit it, so a killed run's orphaned workers never hold its folder."""
    import fcntl  # POSIX; imported here so that importing this module stays portable
    os.makedirs(out, exist_ok=True)
    key = os.path.realpath(out)
    if key in _locks:
        return
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{out} is in use by {holder}: wait for that run to end, or choose another --out") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _locks[key] = f


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
# The lifecycle of a training run in its --out folder

class Run:
    """One training run in the folder out: checkpoint.pt and log.jsonl there, written by rank 0.

    Constructed before the model is loaded, it takes a lock on out, and finds a checkpoint to continue from:
    without resume an existing one is an error (never overwritten unasked), with it the checkpoint must come from
    a run with the same settings ({name: value}, inputs by fingerprint). self.checkpoint is that checkpoint's
    dict (keys, plus "run") or None; the log keeps only the records it holds, so each step is logged once.
    log_key is the record field that counts progress ("step" or "epoch"), the same in checkpoint and log."""

    def __init__(self, out, settings: dict, keys, resume: bool, rank: int = 0, log_key: str = "step",
                 overwrite: bool = False, outputs=(), inputs=None):
        self.out, self.settings, self.rank, self.log_key = Path(out), settings, rank, log_key
        self.checkpoint_path, self.log_path = self.out / "checkpoint.pt", self.out / "log.jsonl"
        if self.out.is_file():
            raise UserError(f"--out {out} is a file: give a folder for the run (a new one, or a run's with --resume)")
        for what, path in (inputs or {}).items():  # the run's files would change the input's identity (fingerprint)
            if path and self.out.exists() and os.path.exists(path) and os.path.samefile(self.out, path):
                raise UserError(f"--out {out} is {what}: the run's files would mix with it; choose another --out")
        if rank == 0:
            lock_out(out)
        # a finished or started run is never replaced unasked: its log, adapter and results (outputs) stay
        used = [n for n in ("log.jsonl", "adapter.safetensors", *outputs) if (self.out / n).exists()]
        if overwrite and not resume:
            self.checkpoint_path.unlink(missing_ok=True)
        elif used and not resume and not self.checkpoint_path.exists() and rank == 0:  # (rank 0 has made the log)
            raise UserError(f"--out {out} holds a run ({', '.join(used)}): add --resume to continue it, --overwrite "
                            f"to replace it, or choose another --out")
        self.checkpoint = resume_checkpoint(self.checkpoint_path, resume, settings, [*keys, log_key])
        if resume and self.checkpoint is None:
            print0(f"--resume: no {self.checkpoint_path} yet, starting a new run")
        self.saved = self.checkpoint[log_key] if self.checkpoint else 0  # progress held by checkpoint.pt
        if rank == 0:
            trim_log(self.log_path, log_key, self.saved)
        self.interrupted = None  # the signal's name once Ctrl-C or SIGTERM arrived inside catch_signals

    def kept(self) -> str:
        return f"{self.checkpoint_path} ({self.log_key} {self.saved}) is kept" if self.saved else "nothing was saved"

    def check_finite(self, where, **values):
        """Stops at the first non-finite loss or gradient norm, before anything is saved over the checkpoint."""
        check_finite(where, self.kept(), **values)

    def log(self, record: dict):
        """Appends record to log.jsonl (rank 0), one line of strict JSON."""
        if self.rank == 0:
            with open(self.log_path, "a", encoding="utf-8") as f:
                log_json(f, record)

    def save(self, state: dict, progress: int):
        """Writes checkpoint.pt atomically (rank 0): state, the run's settings, and progress under log_key."""
        if self.rank == 0:
            atomic_save({**state, self.log_key: progress, "run": self.settings}, self.checkpoint_path)
        self.saved = progress

    def write_adapter(self, tensors: dict, config: dict, name="adapter.safetensors"):
        """The run's result: the adapter's tensors with the run config (JSON) in the safetensors metadata."""
        path = self.out / name
        if self.rank == 0:
            write_safetensors(path, tensors, {"config": json.dumps(config)})
        return path

    @contextlib.contextmanager
    def catch_signals(self):
        """Inside this block Ctrl-C (SIGINT) and SIGTERM (a scheduler's) only set self.interrupted: the loop
        finishes the step in progress, sees should_stop(), saves and stops. A second Ctrl-C stops at once."""
        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = signal.Signals(signum).name
            print(f"\n{self.interrupted}: finishing this step, then saving {self.checkpoint_path} "
                  f"(again to quit at once, losing the step)", file=sys.stderr, flush=True)
        main_thread = threading.current_thread() is threading.main_thread()
        before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
        try:
            yield self
        finally:
            for s, h in before.items():
                signal.signal(s, h)

    def should_stop(self) -> bool:
        """True once any rank was interrupted (all ranks agree: they stop after the same step)."""
        stop = self.interrupted is not None
        if dist.is_initialized():
            flag = torch.tensor([float(stop)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag)
            stop = bool(flag.item())
        return stop

    def stopped_message(self, done, total, unit="steps"):
        """The one line printed when a run stops early: where its state is, how to continue."""
        why = self.interrupted or "--stop-after"
        return (f"stopped by {why} after {done} of {total} {unit}: {self.checkpoint_path} holds it; to continue, "
                f"run the same command with --resume" + ("" if self.interrupted else " (and a later --stop-after, "
                                                         "or none)"))


# -----------------------------------------------------------------------------
# One adapter interface over GIFT and LoRA, for loading saved adapter files: a run config {"method", "targets",
# "rank", and "share" (GIFT) or "lora_alpha" (LoRA)} builds the adapter; its state (plus extra modules, e.g. a new
# head) is saved, loaded and merged the same way whatever the method. The scripts call add_gift / add_lora
# themselves where they adapt a model for training.


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
    return gift_state_dict(model, extra) if hasattr(model, "gift") else lora_state_dict(model, extra)


def load_adapter_state_dict(model: nn.Module, state: dict):
    """Loads what adapter_state_dict saved; strict (every key, every shape), errors name the key."""
    return load_gift_state_dict(model, state) if hasattr(model, "gift") else load_lora_state_dict(model, state)


def merge_adapter(model: nn.Module) -> nn.Module:
    """merge_gift or merge_lora: plain nn.Linear layers with the adapted weights, the base model's keys."""
    return merge_gift(model) if hasattr(model, "gift") else merge_lora(model)


def base_identity(model: nn.Module, skip=()) -> str:
    """A short hash of the base model an adapter belongs to: its tensors' names and shapes, and a sample of each
    one's values (rounded to bf16, so a bf16 and an fp32 load of one checkpoint agree). Adapter tensors (GIFT,
    LoRA) and the modules named in skip (a new head) are left out; a merged model differs from its base."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name or name.startswith("gift.") or name.startswith(tuple(s + "." for s in skip)):
            continue
        h.update(f"{name}{tuple(t.shape)}".encode())
        if t.is_floating_point() and t.numel():
            flat = t.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 64)][:64].to("cpu", torch.bfloat16).float()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_adapter_base(path, config: dict, model: nn.Module, here, skip=(), force=False):
    """The model an adapter is about to run on (loaded from here) must be the one it was trained on (config["base"],
    from base_identity at training): else a UserError naming both, unless force (--any-base: the user knows)."""
    stored, found = config.get("base"), None
    if stored and not force and stored != (found := base_identity(model, skip)):
        raise UserError(f"{path} was trained on {config.get('model') or 'another model'} (identity {stored}), not on "
                        f"{here} (identity {found}): a merged model, another checkpoint or other weights; give the "
                        f"adapter's own base, or add --any-base to apply it anyway")
