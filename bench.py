"""bench.py: what GIFT costs in time and memory, measured beside the frozen-backbone floor, LoRA and full FT.

The default run (no flags) measures, in this order, and prints each table as soon as it is measured:
ViT-B/16 at 224 (batch 2 on a CPU, 32 on a GPU), then LLaMA-7B widths with 2 layers (batch 1 x seq 128),
each for the five variants below plus inference, then the hand-written tokenizers on synthetic vocabularies.
fp32 on a CPU (bf16 on a GPU), 5 timed repetitions after 1 warm-up. On 2 shared CPU cores it takes about
20 minutes; `--model vit` or `--variants gift lora` (no full fine-tuning) make it shorter. Results and how
to read them: docs/bench.md.

One run builds one model with random weights (speed does not depend on their values) and times a training step
(forward, backward, AdamW step) of every variant on the same inputs and machine. The variants share the
backbone's weight tensors, and they are interleaved: each repetition runs every variant once, in an order
rotated by one per repetition, so that drift (clocks, other processes) hits them alike. After warm-up the
median over repetitions is reported, for the ratios the median of the ratios within each repetition.

    floor       backbone frozen, the gradient flows to the first block's input only (no weight gradient):
                what any method with an adapter in every block must pay at least
    gift        GIFT, activation form (gift.py's default): x + (x psi^T) phi^T enters the frozen layer
    gift-param  GIFT, parameter form (the official code's way): W + (W phi) psi is formed on every forward
    lora        LoRA, written minimally in train_common.py: W x + (alpha/r) B A x; A kaiming-uniform, B = 0
    full        full fine-tuning: every parameter is trained

Targets and ranks are the paper's: ViT attn.proj, GIFT r=16 (one Theta), LoRA r=8; LLaMA GIFT r=64 on wq and
wv (one Theta each), LoRA r=32 on wq, wk, wv, w3 (up), w2 (down). Heads and embeddings stay frozen. LoRA's alpha
(--lora-alpha): 1 for ViT as train_vit.py, 2r = 64 for LLaMA as LLM-Adapters; each table says which it used.

Columns: step time (the median) and its ratio to the floor, also in process CPU time (on a shared CPU the
ratio that other processes disturb least; use --threads 1 there, as an idle thread may spin); FLOPs of one
step (torch's FlopCounterMode: matmuls, convolutions, attention); operations per step: on a CPU the aten ops
one training step dispatches (a TorchDispatchMode; views included), on a GPU the kernels it launches
(torch.profiler): a step of small layers is bound by launches, not FLOPs; peak memory = weights + optimizer state +
the peak of what the step allocates (activations saved for backward, gradients, temporaries), read from
max_memory_allocated on a GPU and from a tracker of live tensor storages on a CPU (the same quantity without
the caching allocator's rounding); trainable parameters; the size of the file torch.save writes for the
trainable state. Then inference: the base model, GIFT unmerged and GIFT merged by merge_gift (should be
x1.00). Then the hand-written tokenizers against sentencepiece / tiktoken (when installed) on synthetic
vocabularies, or on real ones given by flag.

Precision: --dtype bf16 (the default on a GPU) runs ViT under bf16 autocast with fp32 weights and LLaMA with
bf16 weights, as the paper; Theta and LoRA's A, B stay fp32 master weights and the adapters compute in the
activations' dtype. fp32 (the default on a CPU, where bf16 matmuls are slower) runs everything in fp32.

Run:
    python bench.py --threads 1 --json bench.json     # CPU: ViT-B/16 batch 2; LLaMA-7B widths, 2 layers, seq 128
    python bench.py --model vit --batch 4 --steps 10  # ViT only
    python bench.py --model llama --compile           # each variant torch.compile'd (compiled in the untimed step)
    python bench.py --model vit --compile --compile-mode reduce-overhead   # and CUDA graphs (GPU)
    python bench.py --model tokenizer --sp-model llama-2-7b/tokenizer.model --tiktoken-model llama-3-8b/tokenizer.model
    python bench.py --device cuda --llama 8b --layers 32 --seq 512 --json bench.json   # GPU: ViT batch 32, bf16
"""
import argparse
import base64
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from gift import add_gift, gift_layers, gift_state_dict, merge_gift
from harness import COMPILE_MODES, compile_model
from tokenizer import LLAMA3_PATTERN, load_tokenizer, train_tiny_tokenizer, write_sentencepiece_model
from lora import add_lora
from llama import ModelArgs, Transformer
from vit import ViT, ViTConfig


LLAMA_SHAPES = {  # Meta's params.json fields; the FFN widths come out as 11008 (7B) and 14336 (8B)
    "7b": dict(dim=4096, n_heads=32, n_kv_heads=32, vocab_size=32000, multiple_of=256),
    "8b": dict(dim=4096, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3,
               rope_theta=500000.0),
    "tiny": dict(dim=128, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32),  # for tests
}
SETTINGS = {  # (GIFT targets, GIFT rank, LoRA targets, LoRA rank): the paper's comparison
    "vit": (["attn.proj"], 16, ["attn.proj"], 8),
    "llama": (["wq", "wv"], 64, ["wq", "wk", "wv", "w3", "w2"], 32),
}
VARIANTS = ("floor", "gift", "gift-param", "lora", "full")

# -----------------------------------------------------------------------------
# Measuring


class PeakTensorBytes(TorchDispatchMode):
    """CPU stand-in for torch.cuda.max_memory_allocated: the peak bytes of tensor storages created under this
    mode and still alive. Every aten op passes here (backward and the optimizer too); an output that shares a
    storage with an input (a view, an in-place op) allocates nothing."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0  # data_ptr -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.now -= n
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                if s.nbytes() and s.data_ptr() not in given and s.data_ptr() not in self.live:
                    self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
                    self.now += s.nbytes()
        self.peak = max(self.peak, self.now)
        return out


class AtenOps(TorchDispatchMode):
    """Counts the aten operations dispatched under this mode (forward, backward and optimizer alike)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, device):
    """CUDA: the GPU kernels (and memcpy/memset) one call of fn launches, from torch.profiler; else the aten ops
    it dispatches. A GPU step of small layers is bound by launches, and each aten op that computes is one."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(device)
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    with AtenOps() as ops:
        fn()
    return ops.n


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict, ref: str, steps: int, warmup: int, device) -> dict:
    """{name: {wall_s, cpu_s, x_ref, x_ref_cpu}}: median wall and process CPU seconds of fn(), and the median
    over repetitions of its time over fns[ref]'s in the same repetition (pairs cancel slow drift). Each
    repetition runs every fn once, in an order rotated by one each time."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for rep in range(steps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    median = statistics.median
    return {name: {"wall_s": median(w for w, _ in ts), "cpu_s": median(c for _, c in ts),
                   "x_ref": median(w / r for (w, _), (r, _) in zip(ts, times[ref])),
                   "x_ref_cpu": median(c / r for (_, c), (_, r) in zip(ts, times[ref]))}
            for name, ts in times.items()}


def instrumented(fn, device):
    """(FLOPs, peak bytes allocated by fn over what was allocated before) of one call of fn."""
    with FlopCounterMode(display=False) as flops:
        if device.type == "cuda":
            _sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            with PeakTensorBytes() as tracker:
                fn()
            peak = tracker.peak
    return flops.get_total_flops(), peak


class _ByteCounter:
    """A file that only counts what torch.save writes to it (a full model's state needs no RAM copy)."""
    def __init__(self):
        self.n = 0

    def write(self, b):
        self.n += len(b)
        return len(b)

    def flush(self):
        pass


def file_size(state: dict) -> int:
    sink = _ByteCounter()
    torch.save(state, sink)
    return sink.n


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind tensors (tied or shared tensors counted once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())

# -----------------------------------------------------------------------------
# The models and their training steps


def build_vit(args, device):
    config = ViTConfig.from_name(args.vit, image_size=args.image_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = ViT(config)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, config.num_classes, (args.batch,), device=device)
    autocast = args.dtype == "bf16"  # fp32 weights, bf16 matmuls (as train_vit.py on a GPU)

    def loss(model):
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            return F.cross_entropy(model(images), labels)

    def infer(model):
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            return model(images)

    desc = f"ViT-{args.vit} at {args.image_size}, batch {args.batch}, " + ("bf16 autocast" if autocast else "fp32")
    info = {"description": desc, "config": asdict(config),
            "tokens_per_step": args.batch * (1 + (args.image_size // config.patch_size) ** 2)}
    return model, loss, infer, "patch_embed", info


def build_llama(args, device):
    config = ModelArgs(**LLAMA_SHAPES[args.llama], n_layers=args.layers, max_seq_len=args.seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config).to(device)  # (the RoPE tables are made on the CPU)
    if args.dtype == "bf16":
        for p in model.parameters():  # bf16 weights, as in the checkpoints; the RoPE tables stay float32
            p.data = p.data.to(torch.bfloat16)
    tokens = torch.randint(0, config.vocab_size, (args.llama_batch, args.seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss(model):  # mean next-token cross-entropy (the model returns the sum)
        return model(inputs, targets) / targets.numel()

    def infer(model):
        return model(inputs)

    desc = (f"LLaMA-{args.llama} widths (dim {config.dim}, FFN {config.ffn_dim}, {config.n_heads}/"
            f"{config.n_kv_heads or config.n_heads} heads, vocab {config.vocab_size}), {args.layers} layers, "
            f"batch {args.llama_batch} x seq {args.seq}, {args.dtype} weights")
    info = {"description": desc, "config": {**asdict(config), "ffn_dim": config.ffn_dim},
            "tokens_per_step": args.llama_batch * args.seq}
    return model, loss, infer, "tok_embeddings", info


def shared_copy(model, keep_own=()):
    """A deep copy of model that shares its parameters and buffers (except those in keep_own), so that every
    variant runs on the very same weight tensors and costs no weight memory of its own."""
    own = {id(t) for t in keep_own}
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in own}
    return copy.deepcopy(model, memo)


def bench_model(kind, args, device):
    model, loss_fn, infer_fn, first, info = (build_vit if kind == "vit" else build_llama)(args, device)
    gift_targets, gift_rank, lora_targets, lora_rank = SETTINGS[kind]
    lora_alpha = args.lora_alpha if args.lora_alpha is not None else 1.0 if kind == "vit" else 2.0 * lora_rank
    backbone = list(model.parameters())
    models, trainable, saved = {}, {}, {}

    models["floor"] = shared_copy(model)  # gradient to the first block's input only: detach it there
    models["floor"].get_submodule(first).register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    trainable["floor"], saved["floor"] = [], {}
    for name, mode in (("gift", "activation"), ("gift-param", "parameter")):
        m = models[name] = shared_copy(model)
        trainable[name] = list(add_gift(m, gift_targets, gift_rank, mode=mode).parameters())
        saved[name] = gift_state_dict(m)
    m = models["lora"] = shared_copy(model)
    trainable["lora"] = [p for layer in add_lora(m, lora_targets, lora_rank, alpha=lora_alpha)
                         for p in (layer.lora_A, layer.lora_B)]
    saved["lora"] = {n: p for n, p in m.named_parameters() if "lora_" in n}
    models["full"], trainable["full"], saved["full"] = model, backbone, model.state_dict()
    fused = device.type == "cuda" or None  # as the scripts: one fused AdamW kernel on a GPU
    opts = {name: torch.optim.AdamW(ps, lr=1e-5, fused=fused) for name, ps in trainable.items() if ps}
    compiled = {name: compiled_model(m, args) for name, m in models.items()}

    def step(name):
        for p in backbone:  # the backbone's tensors are shared: only full fine-tuning trains them
            p.requires_grad_(name == "full")
        loss_fn(compiled[name]).backward()
        if name in opts:
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

    variants = [v for v in VARIANTS if v == "floor" or v in args.variants]  # the floor is every ratio's base
    fns = {name: (lambda name=name: step(name)) for name in variants}
    for name in variants:  # one step each first: AdamW creates its state on its first step (and --compile compiles)
        fns[name]()
    counted = {name: instrumented(fns[name], device) for name in variants}
    ops = {name: count_ops(fns[name], device) for name in variants}
    times = interleaved_times(fns, "floor", args.steps, args.warmup, device)
    weights = tensor_bytes(backbone)
    train = []
    for name in variants:
        flops, step_peak = counted[name]
        opt_state = tensor_bytes([t for s in opts[name].state.values() for t in s.values()
                                  if isinstance(t, torch.Tensor) and t.dim()]) if name in opts else 0
        own = tensor_bytes(trainable[name]) if name != "full" else 0  # adapters' weights (full: in weights)
        t = times[name]
        train.append({"variant": name, "step_s": t["wall_s"], "x_floor": t["x_ref"], "cpu_s": t["cpu_s"],
                      "x_floor_cpu": t["x_ref_cpu"], "flops": flops, "flops_x_floor": flops / counted["floor"][0],
                      "tflops_per_s": flops / t["wall_s"] / 1e12, "tokens_per_s": info["tokens_per_step"] / t["wall_s"],
                      "peak_bytes": weights + own + opt_state + step_peak, "step_peak_bytes": step_peak,
                      "trainable": sum(p.numel() for p in trainable[name]), "ops": ops[name],
                      "file_bytes": file_size(saved[name]) if saved[name] else 0})

    # Inference: the base model, GIFT unmerged, GIFT merged (a copy that owns only the merged weights).
    for p in backbone:
        p.requires_grad_(False)
    gift = models["gift"]
    for theta in gift.gift.values():  # a non-zero Theta, as after training (speed does not depend on it)
        nn.init.normal_(theta.psi.weight, std=1e-3)
    merged = merge_gift(shared_copy(gift, keep_own=[layer.weight for _, layer in gift_layers(gift)]))
    infer = {"base": model, "gift-unmerged": gift, "gift-merged": merged}
    for m in infer.values():
        m.eval()

    @torch.no_grad()
    def run(m):
        infer_fn(m)

    infer = {n: compiled_model(m, args) for n, m in infer.items()}
    for m in infer.values():  # untimed (--compile: compiled here)
        run(m)
    times = interleaved_times({n: (lambda m=m: run(m)) for n, m in infer.items()}, "base", args.steps, args.warmup,
                              device)
    inference = [{"variant": n, "forward_s": t["wall_s"], "x_base": t["x_ref"], "cpu_s": t["cpu_s"],
                  "x_base_cpu": t["x_ref_cpu"]} for n, t in times.items()]
    compiled = args.compile and (f"inductor, mode {args.compile_mode}" if args.compile == "inductor" else args.compile)
    return {"model": kind, **info, "lora": {"rank": lora_rank, "alpha": lora_alpha}, "compiled": compiled,
            "ops_counted": "CUDA kernels" if device.type == "cuda" else "aten ops", "train": train,
            "inference": inference}

# -----------------------------------------------------------------------------
# Tokenizers: the hand-written ones against the reference libraries


def corpus_lines():
    """Text to encode: this repository's own sources (prose and code), one string per non-empty line."""
    here = Path(__file__).resolve().parent
    return [line for f in ("gift.py", "bench.py") for line in (here / f).read_text().splitlines() if line.strip()]


def synthetic_tokenizers(lines, folder, vocab_size):
    """A Llama-3-style rank file learned on lines, and a LLaMA-2-style SentencePiece model whose pieces are
    the same merges (spaces as U+2581), its single characters and the 256 byte pieces. Returns both paths."""
    tiktoken_path = train_tiny_tokenizer(lines, vocab_size, str(Path(folder) / "tiktoken.model"))
    tokens = [base64.b64decode(line.split()[0]) for line in Path(tiktoken_path).read_text().splitlines()]
    chars = sorted({c for line in lines for c in line.replace(" ", "\u2581")})
    merged = []
    for t in tokens[256:]:
        try:
            piece = t.decode("utf-8").replace(" ", "\u2581")
        except UnicodeDecodeError:  # a merge inside a multi-byte character: no SentencePiece piece
            continue
        if len(piece) > 1 and piece not in ("<unk>", "<s>", "</s>"):
            merged.append(piece)
    pieces = ([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
              + [(p, -i, None) for i, p in enumerate(merged + chars)])  # as Meta's: score -(id - 259)
    sp_path = write_sentencepiece_model(str(Path(folder) / "sentencepiece.model"), pieces)
    return sp_path, tiktoken_path


def bench_tokenizers(args):
    """Encodes corpus_lines() line by line with the hand-written tokenizers and the reference libraries."""
    lines, ours = corpus_lines(), "gift (hand-written)"
    with tempfile.TemporaryDirectory() as folder:
        synthetic = () if args.sp_model and args.tiktoken_model else \
            synthetic_tokenizers(lines, folder, args.tokenizer_vocab)
        files = {"sentencepiece": args.sp_model or synthetic[0], "tiktoken": args.tiktoken_model or synthetic[1]}
        rows = []
        for kind, path in files.items():
            def encode_ours():
                tok = load_tokenizer(path)  # fresh on every pass: its per-word cache starts empty, as in a real run
                return [tok.encode(line, False, False) for line in lines]

            encoders = {ours: encode_ours}
            reference = reference_encoder(kind, path, lines)
            if reference is not None:
                encoders[kind] = reference
            ids, times = {}, {}
            for name, encode in encoders.items():
                runs = []
                for _ in range(max(args.steps, 1)):
                    t0 = time.perf_counter()
                    ids[name] = encode()
                    runs.append(time.perf_counter() - t0)
                times[name] = statistics.median(runs)
            n_tokens = sum(map(len, ids[ours]))
            for name in encoders:
                rows.append({"tokenizer": kind, "file": "synthetic" if path in synthetic else Path(path).name,
                             "n_words": load_tokenizer(path).n_words, "implementation": name,
                             "tokens_per_s": n_tokens / times[name],
                             "mb_per_s": sum(len(line.encode()) for line in lines) / times[name] / 1e6,
                             "speed_vs_reference": times[kind] / times[name] if kind in times else None,
                             "same_ids": ids[ours] == ids[kind] if kind in ids else None})
    return {"lines": len(lines), "bytes": sum(len(line.encode()) for line in lines), "rows": rows}


def reference_encoder(kind, path, lines):
    """encode() -> ids of every line by the reference library, or None when it is not installed."""
    try:
        if kind == "sentencepiece":
            import sentencepiece
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
            return lambda: [sp.encode(line) for line in lines]
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        return None
    enc = tiktoken.Encoding("bench", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(path),
                            special_tokens={})
    return lambda: [enc.encode_ordinary(line) for line in lines]

# -----------------------------------------------------------------------------
# Report


def machine(device):
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        name = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")),
                    platform.processor() or platform.machine())
        name += f", {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _size(n):
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB" if n >= 2**10 else f"{n} B"


def compiled_model(model, args):
    """--compile BACKEND [--compile-mode MODE]: the scripts' compile (harness.compile_model) for inductor."""
    if not args.compile:
        return model
    return compile_model(model, args.compile_mode) if args.compile == "inductor" else \
        torch.compile(model, backend=args.compile)


def markdown_machine(result) -> str:
    m = result["machine"]
    return f"{m['device']}, torch {m['torch']}, {m['date']}"


def markdown_model(r, steps) -> str:
    compiled = f", torch.compile ({r['compiled']})" if r["compiled"] else ""
    out = [f"**{r['description']}**{compiled}, LoRA r={r['lora']['rank']} "
           f"alpha={r['lora']['alpha']:g} (medians over {steps} interleaved repetitions)", "",
           f"| variant | train step | x floor | x floor, CPU time | GFLOP | x floor | {r['ops_counted']} | peak memory "
           "| trainable | file |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {t['variant']} | {t['step_s'] * 1e3:,.1f} ms | {t['x_floor']:.3f} | {t['x_floor_cpu']:.3f} | "
            f"{t['flops'] / 1e9:,.1f} | {t['flops_x_floor']:.3f} | {t['ops']:,} | {_size(t['peak_bytes'])} | "
            f"{t['trainable']:,} | {_size(t['file_bytes']) if t['file_bytes'] else '-'} |" for t in r["train"]]
    out += ["", "| inference | forward | x base | x base, CPU time |", "|---|---:|---:|---:|"]
    out += [f"| {i['variant']} | {i['forward_s'] * 1e3:,.1f} ms | {i['x_base']:.3f} | {i['x_base_cpu']:.3f} |"
            for i in r["inference"]]
    return "\n".join(out)


def markdown_tokenizers(tk) -> str:
    out = [f"**Tokenizers** ({tk['lines']} lines, {tk['bytes']:,} bytes of text)", "",
           "| tokenizer | vocabulary | implementation | tokens/s | MB/s | speed vs reference | same ids |",
           "|---|---|---|---:|---:|---:|---|"]
    out += [f"| {t['tokenizer']} | {t['file']} ({t['n_words']:,}) | {t['implementation']} | "
            f"{t['tokens_per_s']:,.0f} | {t['mb_per_s']:.2f} | "
            f"{'-' if t['speed_vs_reference'] is None else format(t['speed_vs_reference'], '.2f')} | "
            f"{'-' if t['same_ids'] is None else t['same_ids']} |"
            for t in tk["rows"]]
    return "\n".join(out)


def markdown(result) -> str:
    parts = [markdown_machine(result)] + [markdown_model(r, result["args"]["steps"]) for r in result["models"]]
    return "\n\n".join(parts + ([markdown_tokenizers(result["tokenizers"])] if "tokenizers" in result else []))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, and every default (a None default is explained in the help)."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=["vit", "llama", "tokenizer", "all"], default="all", help="what to measure")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions before them")
    p.add_argument("--batch", type=int, help="ViT images per step (default: 32 on a GPU, 2 on a CPU)")
    p.add_argument("--llama-batch", type=int, default=1, help="LLaMA sequences per step")
    p.add_argument("--vit", default="B/16", help="ViT size/patch for ViTConfig.from_name (Ti, S, B, L, H)")
    p.add_argument("--image-size", type=int, default=224, help="ViT input resolution")
    p.add_argument("--llama", choices=list(LLAMA_SHAPES), default="7b", help="7b: LLaMA-1/2 7B, 8b: Llama-3 8B")
    p.add_argument("--layers", type=int, default=2, help="LLaMA depth (the real models have 32)")
    p.add_argument("--seq", type=int, default=128, help="LLaMA sequence length")
    p.add_argument("--sp-model", help="a real LLaMA-1/2 tokenizer.model (default: a synthetic one)")
    p.add_argument("--tiktoken-model", help="a real Llama 3 tokenizer.model (default: a synthetic one)")
    p.add_argument("--tokenizer-vocab", type=int, default=1000, help="size of the synthetic vocabularies")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on a CPU (default: torch's choice; on a "
                   "shared CPU pass 1)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="what to train beside the floor (e.g. leave out full to fit a deeper model)")
    p.add_argument("--lora-alpha", type=float, help="LoRA's alpha (update (alpha/r) B A); default: 1 for ViT as "
                   "train_vit.py (loralib, the authors), 2r = 64 for LLaMA as LLM-Adapters. Only LoRA's init and "
                   "values depend on it, not its speed; the table says which was used")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND", help="torch.compile each variant's "
                   "model (and the inference models) with this backend (inductor when none is given; aot_eager "
                   "needs no C++ compiler) before timing; compilation happens in the untimed first step. The ops "
                   "column then counts what the compiled step still dispatches")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="inductor's mode, as the "
                   "scripts' --compile MODE: reduce-overhead adds CUDA graphs (one launch per step on a GPU)")
    p.add_argument("--json", help="also write the results here (rewritten after each part)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    result = {"machine": machine(device), "args": vars(args), "models": []}
    print(markdown_machine(result), flush=True)

    def done(table):  # each part is printed (and saved) as soon as it is measured: a long run is never silent
        print("\n" + table, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({**result, "markdown": markdown(result)}, indent=1))

    for kind in ("vit", "llama"):
        if args.model in (kind, "all"):
            print(f"\nmeasuring {kind}: {', '.join(v for v in VARIANTS if v == 'floor' or v in args.variants)}, "
                  f"then inference ...", file=sys.stderr, flush=True)
            result["models"].append(bench_model(kind, args, device))
            done(markdown_model(result["models"][-1], args.steps))
    if args.model in ("tokenizer", "all"):
        print("\nmeasuring the tokenizers ...", file=sys.stderr, flush=True)
        result["tokenizers"] = bench_tokenizers(args)
        done(markdown_tokenizers(result["tokenizers"]))
    return result


if __name__ == "__main__":
    main()
