"""GIFT: Generative Interpretable Fine-Tuning, in one torch-only file.

Paper: C. Savadikar, X. Song, T. Wu, "GIFT: Generative Interpretable Fine-Tuning", arXiv 2312.00700.
A self-contained tour: `python gift.py` (about 10 s on 2 CPU cores).

A frozen linear layer y = x W^T + b (W: d_out x d_in) is fine-tuned by *generating* its new weight from
the old one with two small linear maps Theta = (phi, psi) that are shared by every layer of one type:

    W_hat = W (I + phi psi)          phi: d_in x r,  psi: r x d_in,  r << d_in
    dW    = (W phi) psi              the shared "generator": the same Theta for every depth

Two forms of the same layer (they agree to rounding; the activation form is what we run):

    parameter form (official code)            activation form (this file's default)
    W ---> phi ---> psi ---> dW               x ----------------------------+
    (d_out,d_in) (d_out,r) (d_out,d_in)       |                             |
    y = x (W + dW)^T + b                      +--> psi^T ---> phi^T ---> (+) --> x_hat --> W^T, b --> y
    2 d_out d_in r FLOPs per layer,           (T,d_in)  (T,r)   (T,d_in)
    a full-size dW and its gradient           y = (x + x psi^T phi^T) W^T + b: 4 d_in r FLOPs per token,
                                              no d_out x d_in matrix is ever built

Theta is stored as the official code's nn.Linear(d_in, r) "phi" and nn.Linear(r, d_in) "psi": their weights
are phi^T (r, d_in) and psi^T (d_in, r), so x psi^T phi^T is x @ psi.weight @ phi.weight, with no transpose.
Trainable parameters: 2 r d_in per Theta whatever the depth (24,576 for ViT-B/16 attn.proj at r=16).

Initialisation: phi keeps PyTorch's default init and psi starts at zero, so dW = 0 and the model at step 0
*is* the pretrained model (as LoRA's B = 0). psi's gradient, phi^T (g W)^T x for the layer's output gradient
g, is not zero, so training starts at once; phi's, (g W)^T x psi^T, is zero until psi moves.

Any Linear layer: the activation form runs the layer's own forward on x_hat, so a subclass that dequantises
(int8, 4-bit), casts or scales its weight stays right: GIFT trains on a quantised base as QLoRA does. The
parameter form, merge_gift and cluster_head compute with W: they need a float weight and say so otherwise.

Interpretability: C = W phi (d_out x r) is an r-way token-clustering head. For a layer's output tokens y
(N x d_out), y @ C (N x r) gives r maps that localise objects and parts in images (cluster_head below).

Precision: Theta's parameters are kept in float32 (float64 for a float64 model): fp32 master weights, as psi
starts at zero and its early updates are far below bf16's resolution. The edit is computed in the activation's
dtype (bf16 for a bf16 model, like autocast): it is added to x in that dtype anyway, so higher precision would
be rounded away at the sum. merge_gift computes W (I + phi psi) in float32/64 and casts once.
Under autocast the edit runs in autocast's dtype: x is cast once (the cast the layer would make anyway).

Cost in operations (a GPU step of small layers is bound by kernel launches, not FLOPs): Theta is the same tensor
in every layer, so its cast to the compute dtype (bf16 weights, or autocast) is made once per forward pass of the
model, in the first layer that needs it, and reused by the others (add_gift's hooks on the model scope it). A
layer then adds 4 aten operations to the forward (view, mm, addmm, view) and 13 to the backward (4 mm, 4 t,
2 view, 3 add), in float32 and under bf16 autocast alike: no cast per layer. On a GPU the views and transposes
launch nothing: 2 kernels forward, 7 backward. test_gift.py counts them (the parameter form: 5 and 16).

Usage:
    from gift import add_gift, gift_disabled, gift_state_dict, merge_gift
    add_gift(model, targets=["q_proj", "v_proj"], rank=64)   # one Theta per type, base frozen
    ... train as usual (only model.gift is trainable) ...
    with gift_disabled(model): ...                             # the base model, nothing copied
    torch.save(gift_state_dict(model), "adapter.pt")           # 2 r d_in numbers per Theta
    merge_gift(model)                                          # plain nn.Linear again, no overhead
"""
import contextlib
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class GIFT(nn.Module):
    """One Theta = (phi, psi): generates dW = (W phi) psi for every layer that shares it."""

    def __init__(self, in_features: int, rank: int):
        super().__init__()
        if not 1 <= rank <= in_features:
            raise ValueError(f"GIFT rank must be in [1, in_features={in_features}], got {rank}")
        self.phi = nn.Linear(in_features, rank, bias=False)  # default (kaiming-uniform) init
        self.psi = nn.Linear(rank, in_features, bias=False)
        nn.init.zeros_(self.psi.weight)                     # dW = 0: step 0 equals the base model
        self._casts = None  # {(dtype, grad mode): weights} while the model's forward runs (add_gift's hooks)

    def weights(self, dtype):
        """phi.weight = phi^T (r, d_in) and psi.weight = psi^T (d_in, r) in `dtype`. Theta is the same in every
        layer, so a cast is made once per forward pass of the model and reused by all its layers (autograd sums
        their gradients through it); outside the model's forward (a layer called alone) each call casts."""
        phi, psi = self.phi.weight, self.psi.weight
        if phi.dtype == dtype:
            return phi, psi
        if self._casts is None or torch.compiler.is_compiling():  # a compiled graph merges repeated casts itself
            return phi.to(dtype), psi.to(dtype)
        key = (dtype, torch.is_grad_enabled())  # a cast made under no_grad carries no graph: not for training
        if key not in self._casts:
            self._casts[key] = phi.to(dtype), psi.to(dtype)
        return self._casts[key]

    def delta(self, weight):
        """Parameter form: dW = (W phi) psi, (d_out, d_in) -> (d_out, d_in); F.linear(a, B) = a B^T."""
        phi_t, psi_t = self.weights(weight.dtype)
        return F.linear(F.linear(weight, phi_t), psi_t)     # (d_out,d_in)@(d_in,r)@(r,d_in)

    def forward(self, x):
        """Activation form: x_hat = x + x psi^T phi^T, (..., d_in) -> (..., d_in), in the dtype the layer computes
        in: under autocast x is cast once here instead of in the layer, so autocast casts nothing more."""
        dtype = _compute_dtype(x)
        phi_t, psi_t = self.weights(dtype)
        x = x.to(dtype)
        rows = x.reshape(-1, x.shape[-1])                   # (N, d_in): addmm wants 2-D; no copy for a contiguous x
        return torch.addmm(rows, rows @ psi_t, phi_t).view(x.shape)  # rows + ((N,d_in)@(d_in,r))@(r,d_in)


def _compute_dtype(x):
    """The dtype a Linear layer multiplies x in: autocast's (which leaves float64 alone), else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


def _open_casts(model, args):   # add_gift's forward hooks on the model: Theta's casts live for one forward pass
    if not torch.compiler.is_compiling():
        for theta in getattr(model, "gift", {}).values():
            theta._casts = {}


def _close_casts(model, args, output):  # also after an exception: no stale cast survives a forward
    for theta in getattr(model, "gift", {}).values():
        theta._casts = None


class GIFTLinear(nn.Module):
    """A frozen Linear layer (nn.Linear or a subclass) run on its input edited by a shared Theta. It shares the
    original module's parameter, buffer and submodule dicts: state_dict keys, .to(), DDP and FSDP are unchanged.
    .base and .theta are plain attributes, not submodules: Theta is saved, moved and optimised once, in model.gift."""

    def __init__(self, base: nn.Linear, theta: GIFT, mode: str):
        super().__init__()
        self.__dict__.update(base=base, theta=theta, _parameters=base._parameters, _buffers=base._buffers,
                             _non_persistent_buffers_set=base._non_persistent_buffers_set, _modules=base._modules)
        self.in_features, self.out_features, self.mode, self.enabled = base.in_features, base.out_features, mode, True
        # In eval() nn.TransformerEncoderLayer reads linear1/2.weight in one fused kernel instead of calling them,
        # unless a submodule has a forward (pre-)hook (torch/nn/modules/transformer.py): this one does nothing.
        self.register_forward_pre_hook(_no_op)

    def forward(self, x):
        if self.mode == "parameter" and self.enabled:       # base is a plain nn.Linear (add_gift checked)
            weight = self.weight.to(_compute_dtype(x))      # under autocast: the cast F.linear would make
            return F.linear(x, weight + self.theta.delta(weight), self.bias)
        return self.base(self.theta(x) if self.enabled else x)  # the layer's own forward; x as is in gift_disabled

    def train(self, mode=True):  # the original module is no child of this one: keep its flag in step
        self.base.train(mode)
        return super().train(mode)

    def _save_to_state_dict(self, *args):  # the original module's own (de)serialisation, e.g. a quantised
        self.base._save_to_state_dict(*args)  # layer's extra state

    def _load_from_state_dict(self, *args):
        self.base._load_from_state_dict(*args)

    def extra_repr(self):
        return f"{type(self.base).__name__}({self.base.extra_repr()}), mode={self.mode}"


def _no_op(module, args):
    pass


def _linear_names(model, limit=40):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "") or "(none)"


def _master_dtype(dtype):  # the dtype of Theta's weights and of merge_gift's sum
    return torch.float64 if dtype == torch.float64 else torch.float32


def _float_weight(name, linear):
    if not linear.weight.is_floating_point():
        raise ValueError(f"layer {name!r} ({type(linear).__name__}) has a {linear.weight.dtype} weight (quantised?): "
                         f"GIFT trains it (mode='activation') but cannot merge into it or draw its cluster maps")
    return linear.weight


def _checked_targets(model, targets, share, mode):
    """{theta key: [(qualified name, Linear)]}, each name of a module, once every up-front check has passed."""
    if hasattr(model, "gift"):
        raise ValueError("add_gift was already called on this model (it has .gift); merge_gift it first")
    if share not in ("type", "all") or mode not in ("activation", "parameter"):
        raise ValueError(f"share must be 'type' or 'all', mode 'activation' or 'parameter'; got {share!r}, {mode!r}")
    if isinstance(model, nn.Sequential):  # it would run model.gift as its last layer
        raise ValueError("add_gift needs a model that is not an nn.Sequential: wrap it in a module of your own")
    modules = dict(model.named_modules(remove_duplicate=False))
    if isinstance(targets, str):  # one regular expression, full match; one Theta per leaf name
        matched = [(n.rsplit(".", 1)[-1], n) for n in modules if n and re.fullmatch(targets, n)]
    else:                          # name suffixes: equal to the entry or ending in "." + entry; Theta per entry
        matched = []
        for entry in targets:
            found = [(entry.replace(".", "_"), n) for n in modules if n and (n == entry or n.endswith("." + entry))]
            if not found:
                raise ValueError(f"target {entry!r} matched no module. Linear layers: {_linear_names(model)}")
            matched += found
    if not matched:
        raise ValueError(f"targets {targets!r} matched no module: give name suffixes (['q_proj', 'v_proj']) or a "
                         f"regex matching whole qualified names. Linear layers: {_linear_names(model)}")
    groups, key_of, sizes = {}, {}, {}  # sizes: group -> {in_features: its first layer}
    for key, name in matched:
        module = modules[name]
        if key_of.setdefault(id(module), key) != key:
            raise ValueError(f"layer {name!r} is matched by more than one target; make the targets disjoint")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear; "
                             f"GIFT edits Linear layers. Linear layers: {_linear_names(model)}")
        if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
            raise ValueError(f"target {name!r} is inside nn.MultiheadAttention, which reads its weight directly "
                             f"instead of calling the layer: GIFT cannot edit it. Target e.g. linear1, linear2")
        if mode == "parameter" and type(module).forward is not nn.Linear.forward:  # F.linear(x, W + dW) would
            raise ValueError(f"target {name!r} is a {type(module).__name__} with its own forward, which the "
                             f"parameter form would bypass; use mode='activation'")
        group = "all" if share == "all" else key
        groups.setdefault(group, []).append((name, module))
        sizes.setdefault(group, {}).setdefault(module.in_features, name)
    for first in sizes.values():
        if len(first) > 1:
            raise ValueError("layers sharing one Theta need the same in_features; got " + ", ".join(
                f"{n} ({size})" for size, n in first.items()) + ". Use share='type' or separate targets")
    return groups


def add_gift(model: nn.Module, targets, rank: int, share: str = "type", mode: str = "activation"):
    """Freezes `model`, wraps each targeted Linear layer in a GIFTLinear and returns the Thetas.

    targets: list of name suffixes (["q_proj", "v_proj"], ["attn.proj"]) or one regex (full match).
    share="type": one Theta per list entry (per leaf name for a regex), the paper's default;
    share="all": one Theta for every targeted layer. The Thetas are registered once as model.gift."""
    groups = _checked_targets(model, targets, share, mode)
    thetas = nn.ModuleDict()  # built before anything changes: a bad rank leaves the model untouched
    for key, found in groups.items():
        first = found[0][1]
        thetas[key] = GIFT(first.in_features, rank).to(first.weight.device, _master_dtype(first.weight.dtype))
    model.requires_grad_(False)
    for m in model.modules():  # in eval() with a padding mask it hands its layers nested tensors, which torch's
        if isinstance(m, nn.TransformerEncoder):  # attention refuses once a layer needs grad (Theta does)
            m.use_nested_tensor = False
    wrapped = {id(m): GIFTLinear(m, thetas[key], mode) for key, found in groups.items() for _, m in found}
    for name, module in list(model.named_modules(remove_duplicate=False)):  # every place a module is used at
        if id(module) in wrapped:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, wrapped[id(module)])
    model.gift = thetas
    thetas._hooks = [model.register_forward_pre_hook(_open_casts),
                     model.register_forward_hook(_close_casts, always_call=True)]
    return thetas


def gift_layers(model: nn.Module):  # [(qualified name, GIFTLinear)] in module order
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GIFTLinear)]


@contextlib.contextmanager
def gift_disabled(model: nn.Module):
    """`with gift_disabled(model):` every GIFT layer computes its base layer: the pretrained model, nothing
    copied. Leaving the block, also by an exception, restores the edit."""
    layers = [layer for _, layer in gift_layers(_unwrap(model))]
    if not layers:
        raise ValueError("this model has no GIFT layer (call add_gift first)")
    before = [layer.enabled for layer in layers]  # restored as they were: gift_disabled blocks may nest
    try:
        for layer in layers:
            layer.enabled = False
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.enabled = enabled


@torch.no_grad()
def merge_gift(model: nn.Module) -> nn.Module:
    """Writes W (I + phi psi) into every GIFT layer, puts the original modules back, drops model.gift."""
    if not hasattr(model, "gift"):
        raise ValueError("this model has no GIFT to merge (add_gift was not called, or it was merged already)")
    layers = gift_layers(model)
    weights = [_float_weight(name, layer.base) for name, layer in layers]  # all checked before any write
    for w, (_, layer) in zip(weights, layers):
        acc = w.to(_master_dtype(w.dtype))
        w.copy_(acc + layer.theta.delta(acc))              # computed in float32/64, cast back by copy_
    for name, layer in [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, GIFTLinear)]:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer.base)
    for hook in model.gift._hooks:
        hook.remove()
    del model.gift
    return model


def _unwrap(model):
    """The model under DDP / DataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def gift_state_dict(model: nn.Module, extra=()) -> dict:
    """Theta tensors plus the state of the named extra submodules (e.g. a new head), with clean keys."""
    model = _unwrap(model)
    if not hasattr(model, "gift"):
        raise ValueError("this model has no GIFT (call add_gift first)")
    state = model.gift.state_dict(prefix="gift.")
    for name in extra:
        state.update(model.get_submodule(name).state_dict(prefix=name + "."))
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def load_gift_state_dict(model: nn.Module, state: dict):
    """Loads what gift_state_dict saved. Strict: every Theta tensor must be there, every key must exist
    in the model and every shape must match; anything else is an error naming the key."""
    model = _unwrap(model)
    if not hasattr(model, "gift"):
        raise ValueError("call add_gift with the adapter's targets, rank and share before loading it")
    state = {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in state.items()}
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k.startswith("gift.") and k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing keys {missing}, unexpected keys {unexpected}"
                         " (were targets or share different when it was saved?)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"adapter key {k!r} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)} (a different rank or layer size?)")
        own[k].copy_(v)


def count_parameters(model: nn.Module):
    """(trainable, total), each shared tensor counted once."""
    params = list(model.parameters())  # parameters() yields each tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


@torch.no_grad()
def cluster_head(layer: GIFTLinear):
    """C = W phi (d_out, r), float32: for output tokens y (N, d_out) of `layer`, y @ C are r cluster maps."""
    return F.linear(_float_weight(type(layer.base).__name__, layer.base).float(), layer.theta.phi.weight.float())


if __name__ == "__main__":  # a tour on torch's own nn.TransformerEncoder, a model this file never saw
    import copy
    import io
    import time

    class Classifier(nn.Module):
        def __init__(self, vocab=16, dim=64, depth=4):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            block = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
            self.head = nn.Linear(dim, 2)

        def forward(self, tokens):                                     # (B, T) -> (B, 2)
            return self.head(self.encoder(self.embed(tokens)).mean(1))

    t0, targets, rank = time.time(), ["linear1", "linear2"], 8
    torch.manual_seed(0)
    base = Classifier().double().requires_grad_(False)  # frozen like the GIFT model: torch picks the same kernels
    model = copy.deepcopy(base)
    add_gift(model, targets, rank)
    lora = sum(rank * (m.in_features + m.out_features) for _, m in gift_layers(model))
    print(f"GIFT on {targets}, rank {rank}: {parameter_summary(model)}\n"
          f"  2*r*d_in per Theta: {[2 * rank * t.phi.in_features for t in model.gift.values()]}; "
          f"LoRA at the same targets and rank would train {lora:,}")

    tokens = torch.randint(0, 16, (8, 12))
    print(f"step 0 equals the base model: {torch.equal(model(tokens), base(tokens))}")
    for theta in model.gift.values():                                  # a random, non-zero Theta
        nn.init.normal_(theta.psi.weight, std=0.05)
    param_form = copy.deepcopy(base)
    add_gift(param_form, targets, rank, mode="parameter")
    load_gift_state_dict(param_form, gift_state_dict(model))
    merged = merge_gift(copy.deepcopy(model))
    a, p, m = model(tokens), param_form(tokens), merged(tokens)
    print(f"float64, random Theta: |activation - parameter| = {(a - p).abs().max():.1e}, "
          f"|activation - merged| = {(a - m).abs().max():.1e}")
    with torch.no_grad():
        e = model.eval()(tokens)             # torch's fused encoder path stays off: linear1/linear2 run
        with gift_disabled(model):           # the base model, from the same object
            b = model(tokens)
    model.train()
    print(f"eval() under no_grad: |eval - train| = {(e - a).abs().max():.1e}; "
          f"gift_disabled: |model - base| = {(b - base(tokens)).abs().max():.1e}")

    # Train Theta and the head on a generated task: is token 3 more frequent than token 5?
    torch.manual_seed(0)
    model = copy.deepcopy(base).float()
    add_gift(model, targets, rank)
    model.head.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    test_x = torch.randint(0, 16, (512, 12))
    test_y = ((test_x == 3).sum(1) > (test_x == 5).sum(1)).long()
    for step in range(1, 151):
        x = torch.randint(0, 16, (64, 12))
        loss = F.cross_entropy(model(x), ((x == 3).sum(1) > (x == 5).sum(1)).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                acc = (model.eval()(test_x).argmax(1) == test_y).float().mean()
            model.train()
            print(f"step {step:3d}  loss {loss.item():.3f}  test accuracy {acc:.3f}")

    buf = io.BytesIO()
    torch.save(gift_state_dict(model, extra=["head"]), buf)
    with torch.no_grad():
        before = model.eval()(test_x)
        after = merge_gift(model)(test_x)                              # merged: torch's fused path
    print(f"adapter file: {buf.tell():,} bytes; merged model keys == base keys: "
          f"{list(model.state_dict()) == list(base.state_dict())}; |unmerged - merged| = "
          f"{(before - after).abs().max():.1e} (float32); tour took {time.time() - t0:.1f} s")
