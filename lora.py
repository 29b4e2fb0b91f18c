"""LoRA (Hu et al. 2021, arXiv 2106.09685), the baseline GIFT is compared with, shaped like gift.py.

A frozen linear layer y = x W^T + b gets a trainable low-rank update of its own, in every targeted layer:

    W_hat = W + (alpha/r) B A         A: r x d_in,  B: d_out x r      (one pair per layer, nothing shared)

    x ---------------------------> W^T, b ----------------------+
    |                                                           |
    +--> A^T ---> (* alpha/r) ---> B^T ---------------------> (+) --> y
    (T,d_in)  (T,r)            (T,r)      (T,d_out)

Trainable parameters: r (d_in + d_out) per layer, so they grow with depth; GIFT's 2 r d_in per Theta do not.
A keeps nn.Linear's kaiming-uniform init (as loralib and PEFT) and B starts at zero: step 0 is the base model.
A and B are fp32 master weights (float64 for a float64 model) and compute in the activation's dtype.

Usage (the same calls as gift.py):
    from lora import add_lora, lora_disabled, lora_state_dict, load_lora_state_dict, merge_lora
    add_lora(model, targets=["q_proj", "v_proj"], rank=8, alpha=16)   # base frozen
    torch.save(lora_state_dict(model), "lora.pt")                     # only the A and B tensors
    merge_lora(model)                                                 # plain nn.Linear again
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus (alpha/r) B A. weight and bias are the original Parameter objects under the same
    names, so the model's state_dict keeps its keys (plus .lora_A, .lora_B); the original module, emptied of
    them, sits in an unregistered tuple and merge_lora puts it back."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank must be in [1, {min(base.in_features, base.out_features)}], got {rank}")
        w = base.weight
        self.weight, self.bias = base.weight, base.bias
        del base.weight, base.bias
        self.in_features, self.out_features, self.scale, self.enabled = base.in_features, base.out_features, \
            alpha / rank, True
        self.refs = (base,)
        master = dict(device=w.device, dtype=torch.float64 if w.dtype == torch.float64 else torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **master))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **master))  # B = 0: step 0 is the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))                       # as nn.Linear, loralib and PEFT

    def forward(self, x):  # the scale multiplies the small (.., r) product, not the (.., d_out) one
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + F.linear(F.linear(x, a) * self.scale, b)  # (..,d_in) -> (..,r) -> (..,d_out)

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
    chosen = dict(item for hits in found.values() for item in hits)
    for name in chosen:
        if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
            raise ValueError(f"target {name!r} is inside nn.MultiheadAttention, which reads its weight directly "
                             f"instead of calling the layer, so LoRA cannot edit it")
        if not 1 <= rank <= min(chosen[name].in_features, chosen[name].out_features):  # before anything changes
            raise ValueError(f"LoRA rank must be in [1, min(d_in, d_out)] of {name!r}, got {rank}")
    model.requires_grad_(False)
    layers = []
    for name, module in chosen.items():
        parent, _, leaf = name.rpartition(".")
        layers.append(LoRALinear(module, rank, alpha))
        setattr(model.get_submodule(parent), leaf, layers[-1])
    return layers


def lora_layers(model: nn.Module):
    """[(qualified name, LoRALinear)] in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """`with lora_disabled(model):` every LoRA layer computes its base layer; restored on leaving the block."""
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("this model has no LoRA layer (call add_lora first)")
    before = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = False
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.enabled = enabled


def lora_state_dict(model: nn.Module, extra=()) -> dict:
    """Every LoRA layer's A and B plus the state of the named extra submodules (e.g. a new head)."""
    if not lora_layers(model):
        raise ValueError("this model has no LoRA layer (call add_lora first)")
    state = {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    for name in extra:
        state.update(model.get_submodule(name).state_dict(prefix=name + "."))
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict):
    """Loads what lora_state_dict saved. Strict: every A and B must be there, every key must exist in the model
    and every shape must match; anything else is an error naming the key."""
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


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Writes W + (alpha/r) B A into every LoRA layer and puts the plain nn.Linear back: the state_dict has the
    base model's keys again. The sum is computed in float32 (float64 for float64 weights) and cast once."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layer to merge (add_lora was not called, or it was merged already)")
    for name, layer in layers:
        acc = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        delta = (layer.lora_B.to(acc) @ layer.lora_A.to(acc)) * layer.scale  # (d_out,r)@(r,d_in)
        layer.weight.copy_(layer.weight.to(acc) + delta)
        base = layer.refs[0]
        base.register_parameter("weight", layer.weight)  # the layer's current tensors (.to() may have replaced them)
        base.register_parameter("bias", layer.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, base)
    return model
