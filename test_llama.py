"""Tests for llama.py: the model against transformers and Meta's shard layout, the checkpoint readers (Meta
shards, HF llama / mistral / qwen2 folders, HF Llama's attention_bias), generation with the KV cache, gradient
checkpointing, the adapter targets' names. Tiny models, on the CPU."""
import copy
import json
import re
import shutil
import time

import pytest
import torch

import llama as tl
from fileio import UserError, read_safetensors, write_safetensors
from gift import add_gift

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama_args(gqa=True, llama3=False, **kw):
    return tl.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2 if gqa else None, vocab_size=96,
                        multiple_of=32, norm_eps=1e-5, rope_theta=500000.0 if llama3 else 10000.0,
                        use_scaled_rope=llama3,
                        rope_scaling={**tl.LLAMA31_ROPE_SCALING, "original_max_position_embeddings": 64}
                        if llama3 else None, max_seq_len=128, **kw)


def _llama_model(args, seed=0):
    """A random float64 model whose norms are not all ones (so a norm loaded wrongly shows)."""
    torch.manual_seed(seed)
    model = tl.Transformer(args).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" not in name else 0.2) + ("norm" in name))
    return model.eval()


def _llama_tokens(vocab=96, shape=(2, 17), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _llama_write_shards(model, path, n, llama3, params=None):
    """Meta's model-parallel layout: column-parallel weights split on dim 0, row-parallel ones on dim 1."""
    path.mkdir(parents=True, exist_ok=True)
    state, shards = model.state_dict(), [{} for _ in range(n)]
    for key, t in state.items():
        name = key.split(".")[-2]
        dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
               "tok_embeddings": 0 if llama3 else 1}.get(name)
        for i in range(n):
            shards[i][key] = t.clone() if dim is None else t.chunk(n, dim)[i].clone()
            if not llama3:
                shards[i]["rope.freqs"] = torch.ones(8)
    for i, s in enumerate(shards):
        torch.save(s, path / f"consolidated.{i:02d}.pth")
    a = model.args
    params = params or {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                        "vocab_size": a.vocab_size, "multiple_of": a.multiple_of, "norm_eps": a.norm_eps,
                        "rope_theta": a.rope_theta, "use_scaled_rope": a.use_scaled_rope,
                        "rope_scaling": a.rope_scaling}
    (path / "params.json").write_text(json.dumps(params))
    return path


def _llama_hf(tmp_path, gqa, llama3, tie=False, shard=None):
    """transformers' LlamaForCausalLM (float64, random, norms perturbed), saved as safetensors (sharded with
    an index when shard, e.g. "50KB", is given)."""
    transformers = pytest.importorskip("transformers")
    rope = ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64} if llama3
            else {"rope_type": "default", "rope_theta": 10000.0})
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2 if gqa else 4, intermediate_size=96, vocab_size=96,
                                   rms_norm_eps=1e-5, rope_parameters=rope, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("llama3", [False, True])
def test_llama_meta_two_shards_equal_unsharded(tmp_path, llama3):
    model = _llama_model(_llama_args(gqa=True, llama3=llama3))
    params = None
    if not llama3:  # Llama 1/2 style params.json: nested under "model", vocab_size -1, an unknown key
        a = model.args
        params = {"model": {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                            "vocab_size": -1, "multiple_of": a.multiple_of, "norm_eps": a.norm_eps},
                  "some_unknown_key": 1}
    path = _llama_write_shards(model, tmp_path / "meta", 2, llama3, params)
    loaded = tl.load_llama(path, max_seq_len=128)
    assert loaded.args == model.args
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key
    tokens = _llama_tokens()
    assert torch.equal(loaded(tokens), model(tokens))


def test_llama_ffn_sizes_and_params():
    sizes = [(4096, 256, None), (5120, 256, None), (8192, 4096, 1.3), (4096, 1024, 1.3)]
    assert [tl.ModelArgs(dim=d, multiple_of=m, ffn_dim_multiplier=f).ffn_dim for d, m, f in sizes] == \
        [11008, 13824, 28672, 14336]
    a = tl.ModelArgs.from_params({"model": {"dim": 8, "n_heads": 2, "foo": 3}}, max_seq_len=16)
    assert (a.dim, a.n_heads, a.max_seq_len, a.n_layers) == (8, 2, 16, 32)


@pytest.mark.parametrize("gqa,llama3", [(False, False), (True, False), (False, True), (True, True)])
def test_llama_logits_match_transformers(tmp_path, gqa, llama3):
    hf, path = _llama_hf(tmp_path, gqa, llama3)
    ours = tl.load_llama(path)
    assert ours.args.use_scaled_rope == llama3 and ours.args.n_kv_heads == (2 if gqa else 4)
    tokens = _llama_tokens(shape=(2, 100))  # long enough for RoPE's scaled frequencies to matter
    with torch.no_grad():
        ref = hf(tokens).logits
    out = ours(tokens)
    assert out.dtype == torch.float32 and out.shape == (2, 100, 96)
    assert torch.allclose(ours.double()(tokens).double(), ref, atol=1e-5, rtol=0) and (ref.abs().max() > 0.1)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_hf_and_meta_forms_equal(tmp_path, tie):
    hf, path = _llama_hf(tmp_path, gqa=True, llama3=True, tie=tie, shard=None if tie else "50KB")
    from_hf = tl.load_llama(path)
    if tie:
        assert "lm_head.weight" not in read_safetensors(path / "model.safetensors")
    else:  # sharded: model-0000k-of-0000N.safetensors + model.safetensors.index.json
        assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    tl.save_meta(from_hf, tmp_path / "meta")
    from_meta = tl.load_llama(tmp_path / "meta")
    tokens = _llama_tokens()
    assert torch.equal(from_hf(tokens), from_meta(tokens))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert torch.allclose(from_hf(tokens).double(), ref, atol=1e-5)
        bf16 = tl.load_llama(path, dtype=torch.bfloat16)  # the GPU dtype: RoPE and RMSNorm still in float32
        assert bf16.tok_embeddings.weight.dtype == torch.bfloat16 and bf16.cos.dtype == torch.float32
        assert (bf16(tokens).double() - ref).abs().max() < 0.05 * ref.abs().max()


# --- Hub checkpoints of the Llama family: model_type llama, mistral, qwen2 --------------------------------

LLAMA32_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _hub_model(tmp_path, model_type, shard=None, **cfg):
    """transformers' <Type>ForCausalLM from a small random config (float32, every weight random, biases and
    norms included), saved as an HF folder whose config.json has the Hub's form (rope_theta and rope_scaling
    at the top level; transformers 5 writes rope_parameters instead)."""
    transformers = pytest.importorskip("transformers")
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
    config = getattr(transformers, name + "Config")(**{
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, **cfg})
    torch.manual_seed(0)
    hf = getattr(transformers, name + "ForCausalLM")(config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + ("norm" in n))
    path = tmp_path / model_type
    hf.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    c = json.loads((path / "config.json").read_text())
    if "rope_parameters" in c:
        rope = c.pop("rope_parameters")
        c |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": None if rope["rope_type"] == "default" else rope}
        (path / "config.json").write_text(json.dumps(c))
    return hf, path


@pytest.mark.parametrize("model_type,cfg", [
    ("llama", {"tie_word_embeddings": True, "rope_parameters": LLAMA32_ROPE}),       # Llama 3.2 1B's form
    ("mistral", {"sliding_window": 48, "rope_theta": 1e6}),                           # Mistral 7B v0.1's form
    ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1e6, "sliding_window": 16,  # Qwen2.5 0.5B's form
               "use_sliding_window": False}),
    ("qwen2", {"head_dim": 32}),                                                      # head_dim != dim / heads
    ("llama", {"attention_bias": True}),                                              # biases on q, k, v and o
])
def test_llama_hub_family_logits_match_transformers(tmp_path, model_type, cfg):
    """Our logits equal transformers' (float32, random weights of size ~0.2: within 1e-4 of logits ~1 to 10)."""
    hf, path = _hub_model(tmp_path, model_type, shard="40KB" if model_type == "mistral" else None, **cfg)
    ours = tl.load_llama(path)
    a, rope = ours.args, cfg.get("rope_parameters", {})
    assert a.attention_bias == (model_type == "qwen2" or "attention_bias" in cfg)
    assert a.tie_embeddings == cfg.get("tie_word_embeddings", False)
    assert a.rope_theta == cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    assert a.use_scaled_rope == (rope.get("rope_type") == "llama3") and a.head_dim == cfg.get("head_dim")
    assert a.sliding_window == (48 if model_type == "mistral" else None)  # qwen2's is off (use_sliding_window)
    assert a.wo_bias == ("attention_bias" in cfg) and (ours.layers[1].attention.wo.bias is not None) == a.wo_bias
    tokens = _llama_tokens(shape=(2, 48))  # long enough for Llama 3.2's scaled frequencies to matter
    with torch.no_grad():
        ref, out = hf(tokens).logits, ours(tokens)
    assert out.dtype == torch.float32 and ref.abs().max() > 1
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    tl.save_meta(ours, tmp_path / "meta")  # --merge's output reads back as the same model (biases included)
    with torch.no_grad():  # as `out` was: grad mode may pick other attention kernels, so the same mode for both
        assert torch.equal(tl.load_llama(tmp_path / "meta")(tokens), out)
    if model_type == "mistral":
        with pytest.raises(ValueError, match="sliding window of 48"):
            ours(_llama_tokens(shape=(1, 49)))


def test_llama_smollm2_real_weights_same_greedy_answer_as_transformers(smollm2):
    """SmolLM2-135M-Instruct, an HF folder as the Hub has it (Q4_1-dequantised real weights), with our
    tokenizer: the same prompt ids and greedy tokens as transformers, and the answer everyone knows."""
    transformers = pytest.importorskip("transformers")
    ref_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ref_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    tok = tl.find_tokenizer(smollm2)
    assert tok.encode(ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                      tok.add_bos, eos=False) == prompt
    ours = tl.load_llama(smollm2)
    assert ours.args.tie_embeddings and (ours.args.n_kv_heads, ours.args.rope_theta) == (3, 100000)
    got = tl.generate(ours.eval(), [prompt], 20, tok.stop_ids)[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert got + [tok.eos_id] == want
    assert tok.decode(got) == "The capital of France is Paris."


def test_llama_generate_with_cache_equals_full_forwards():
    model = _llama_model(_llama_args(gqa=True, llama3=True))
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 4, 6, 10], [11]]

    def greedy(p, n, stops=()):  # one prompt, no padding, no cache: a full forward per token
        seq, out = list(p), []
        for _ in range(n):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            if nxt in stops:
                break
            seq.append(nxt)
            out.append(nxt)
        return out

    ref = [greedy(p, 12) for p in prompts]
    assert tl.generate(model, prompts, 12) == ref
    eos = ref[1][3]  # a token prompt 1 generates: generation stops before it
    got = tl.generate(model, prompts, 12, eos_id=eos)
    assert got == [greedy(p, 12, [eos]) for p in prompts] and len(got[1]) == 3
    stops = [ref[0][2], ref[2][1]]  # several (a tokenizer's stop_ids): each prompt stops at the first it meets
    got = tl.generate(model, prompts, 12, eos_id=stops)
    assert got == [greedy(p, 12, stops) for p in prompts] and len(got[0]) <= 2 and len(got[2]) <= 1
    assert tl.generate(model, prompts, 0) == [[], [], []]


def _llama_error(path, match):
    with pytest.raises(ValueError, match=match):
        tl.load_llama(path)


def test_llama_bad_checkpoints_raise(tmp_path):
    model = _llama_model(_llama_args())
    good = _llama_write_shards(model, tmp_path / "good", 1, llama3=True)
    state = torch.load(good / "consolidated.00.pth", weights_only=True)
    for name, change in [("missing", lambda s: s.pop("layers.1.attention.wk.weight")),
                         ("shape", lambda s: s.update({"layers.0.feed_forward.w2.weight": torch.zeros(64, 95)})),
                         ("extra", lambda s: s.update({"layers.0.attention.bias": torch.zeros(3)}))]:
        bad = _llama_write_shards(model, tmp_path / name, 1, llama3=True)
        s = copy.copy(state)
        change(s)
        torch.save(s, bad / "consolidated.00.pth")
        key = {"missing": "layers.1.attention.wk.weight", "shape": "layers.0.feed_forward.w2.weight",
               "extra": "layers.0.attention.bias"}[name]
        _llama_error(bad, f"{bad}.*consolidated.00.pth.*{key}")
    raw = (good / "consolidated.00.pth").read_bytes()
    (good / "consolidated.00.pth").write_bytes(raw[:len(raw) // 2])
    _llama_error(good, "consolidated.00.pth: cannot read")
    two = _llama_write_shards(model, tmp_path / "two", 2, llama3=True)
    s = torch.load(two / "consolidated.01.pth", weights_only=True)
    s.pop("norm.weight")
    torch.save(s, two / "consolidated.01.pth")
    _llama_error(two, "consolidated.01.pth: key 'norm.weight' is in only one")


def test_llama_bad_hf_checkpoint_raises(tmp_path):
    _, path = _llama_hf(tmp_path, gqa=True, llama3=False)
    raw = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[:-100])
    _llama_error(path, "model.safetensors")
    (path / "model.safetensors").write_bytes(raw)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    _llama_error(path, "model.layers.0.mlp|feed_forward.w1")
    for change, match in [({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
                          ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                          ({"mlp_bias": True}, "mlp_bias"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'")]:
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        _llama_error(path, f"config.json: {match}")


def test_llama_grad_checkpointing_same_gradients():
    model = _llama_model(_llama_args())
    add_gift(model, ["attention.wq", "attention.wv"], 4)
    with torch.no_grad():
        for theta in model.gift.values():
            theta.psi.weight.normal_(0, 0.1)
    model.train()
    tokens = _llama_tokens()
    targets = tokens.roll(-1, 1)
    targets[:, :5] = -100
    calls, grads = [], []
    model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        model(tokens, targets).backward()
        grads.append([p.grad.clone() for p in model.gift.parameters()])
    assert len(calls) == 3  # once without; forward + recomputation in backward with checkpointing
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12, rtol=0) and a.abs().max() > 0


@pytest.mark.parametrize("given,names", [
    (["q_proj", "v_proj"], ["attention.wq", "attention.wv"]),
    (["self_attn.o_proj", "gate_proj", "up_proj", "down_proj", "k_proj"],
     ["attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2", "attention.wk"]),
    (["wq", "attention.wv", "w2", "layers.1.attention.wq"],
     ["attention.wq", "attention.wv", "feed_forward.w2", "layers.1.attention.wq"])])
def test_llama_layer_names_accept_meta_and_hf_names(given, names):
    assert tl.layer_names(given) == names


@pytest.mark.parametrize("bad", ["q_porj", "attention.wx", "mlp", "layers.x.attention.wq"])
def test_llama_layer_names_refuse_others_listing_the_valid_ones(bad):
    with pytest.raises(UserError, match=rf"--targets {bad}: LLaMA has no layer of that name; valid: attention.wq, "
                                        r".*feed_forward.w2 \(or wq, .*HF's q_proj, k_proj"):
        tl.layer_names(["wq", bad])


# -----------------------------------------------------------------------------
# Issue 22: hostile config and weight files, each one line naming the file, the field and the value, found before
# anything is built

@pytest.fixture(scope="module")
def _llama_hf_dir(tmp_path_factory):
    return _llama_hf(tmp_path_factory.mktemp("hf"), gqa=True, llama3=True)[1]


@pytest.mark.parametrize("change,match", [
    ({"vocab_size": 96.0}, r"vocab_size is 96.0 \(float\), expected a whole number at least 1"),
    ({"num_hidden_layers": 2.5}, r"num_hidden_layers is 2.5 \(float\), expected a whole number"),
    ({"hidden_size": "64"}, r"hidden_size is '64' \(str\), expected a whole number"),
    ({"num_attention_heads": 0}, r"num_attention_heads is 0 \(int\), expected a whole number at least 1"),
    ({"intermediate_size": -96}, r"intermediate_size is -96 \(int\), expected a whole number at least 1"),
    ({"num_key_value_heads": 3}, r"4 attention heads cannot share 3 key/value heads"),
    ({"rms_norm_eps": "1e-5"}, r"rms_norm_eps is '1e-5' \(str\), expected a number greater than 0"),
    ({"rms_norm_eps": 0}, r"rms_norm_eps is 0 \(int\), expected a number greater than 0"),
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings is 'false' \(str\), expected true or false"),
    ({"attention_bias": 1}, r"attention_bias is 1 \(int\), expected true or false"),
    ({"head_dim": 0}, r"head_dim is 0 \(int\), expected a whole number at least 1"),
    ({"head_dim": 15}, r"head width 15 is odd"),
    ({"rope_scaling": 5}, r"rope_scaling is 5 \(int\), expected a JSON object"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 64}}, r"\(rope_scaling\): factor is '8' \(str\)"),
    ({"max_position_embeddings": 0}, r"max_position_embeddings is 0 \(int\), expected a whole number at least 1"),
    ({"eos_token_id": [2, "3"]}, r"eos_token_id is '3' \(str\), expected a whole number at least 0, at most 95"),
    ({"bos_token_id": 96}, r"bos_token_id is 96 \(int\), expected a whole number at least 0, at most 95"),
    ({"torch_dtype": 16}, r"torch_dtype is 16 \(int\), expected a string"),
    ({"attention_dropout": 5}, r"attention_dropout is 5 \(int\), expected a number at least 0, at most 1"),
    ({"model_type": "mistral", "sliding_window": "48"}, r"sliding_window is '48' \(str\), expected a whole number"),
    ({"vocab_size": 10 ** 12}, r"the config says vocab_size 1000000000000 and width 64, the embedding "
                               r"tok_embeddings.weight is \(96, 64\)"),
    ({"num_hidden_layers": 10 ** 6}, r"the config says 1000000 layers, the files hold 2 \(layers.0, layers.1\)")])
def test_llama_hf_config_fields_are_checked_before_building(_llama_hf_dir, tmp_path, change, match):
    """Issue 22 classes 2 and 3: read_args (what an adapter or a tokenizer is checked against) and load_llama
    both refuse at once (10^12 embedding rows or 10^6 layers are never built), naming file, field and value."""
    path = shutil.copytree(_llama_hf_dir, tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_scaling", None) if "rope_parameters" in change else None
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    for read in (tl.read_args, tl.load_llama):
        t0 = time.time()
        with pytest.raises(UserError, match=match) as e:
            read(path)
        assert time.time() - t0 < 5 and "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("change,match", [
    ({"dim": 64.0}, r"dim is 64.0 \(float\), expected a whole number at least 1"),
    ({"n_layers": "2"}, r"n_layers is '2' \(str\), expected a whole number"),
    ({"n_heads": 0}, r"n_heads is 0 \(int\), expected a whole number at least 1"),
    ({"n_kv_heads": 3}, r"4 attention heads cannot share 3 key/value heads"),
    ({"vocab_size": 0}, r"vocab_size is 0, expected -1 \(the embedding's rows\) or at least 1"),
    ({"vocab_size": -5}, r"vocab_size is -5 \(int\), expected a whole number at least -1"),
    ({"norm_eps": -1e-5}, r"norm_eps is -1e-05 \(float\), expected a number greater than 0"),
    ({"rope_theta": True}, r"rope_theta is True \(bool\), expected a number greater than 0"),
    ({"use_scaled_rope": "yes"}, r"use_scaled_rope is 'yes' \(str\), expected true or false"),
    ({"multiple_of": 0}, r"multiple_of is 0 \(int\), expected a whole number at least 1"),
    ({"ffn_dim_multiplier": 0}, r"ffn_dim_multiplier is 0 \(int\), expected a number greater than 0"),
    ({"rope_scaling": {"factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                       "original_max_position_embeddings": 64}}, r"high_freq_factor 1.0 must exceed"),
    ({"vocab_size": 10 ** 12}, r"the config says vocab_size 1000000000000 and width 64"),
    ({"n_layers": 10 ** 6}, r"the config says 1000000 layers, the files hold 2"),
    ("list", r"params.json: expected a JSON object of the model's sizes, got list")])
def test_llama_meta_params_fields_are_checked_before_building(tmp_path, change, match):
    model = _llama_model(_llama_args(gqa=True, llama3=True))
    path = _llama_write_shards(model, tmp_path / "meta", 2, llama3=True)
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps([params] if change == "list" else {**params, **change}))
    for read in (tl.read_args, tl.load_llama):
        t0 = time.time()
        with pytest.raises(UserError, match=match) as e:
            read(path)
        assert time.time() - t0 < 5 and "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("form", ["hf", "meta"])
def test_llama_integer_weights_are_refused(_llama_hf_dir, tmp_path, form):
    """Issue 22 class 1: a weight stored as integers (a header saying I32) would be read as numbers and trained
    on, silently wrong: refused naming the file and the key."""
    key = "model.layers.1.mlp.up_proj.weight" if form == "hf" else "layers.1.feed_forward.w3.weight"
    if form == "hf":
        path = shutil.copytree(_llama_hf_dir, tmp_path / "hf")
        state = read_safetensors(path / "model.safetensors")
        state = {k: v.clone() for k, v in state.items()} | {key: state[key].to(torch.int32)}
        write_safetensors(path / "model.safetensors", state)
    else:
        path = _llama_write_shards(_llama_model(_llama_args()), tmp_path / "meta", 1, llama3=True)
        state = torch.load(path / "consolidated.00.pth", weights_only=True)
        torch.save(state | {key: state[key].to(torch.int32)}, path / "consolidated.00.pth")
    for read in (tl.read_args, tl.load_llama):
        with pytest.raises(UserError, match=rf"tensor '{re.escape(key)}' is stored as torch.int32, but a model "
                                            rf"weight is floating point"):
            read(path)


def test_llama_read_args_resolves_meta_vocab_from_the_files(tmp_path):
    """read_args: a Meta vocab_size of -1 (Llama 1/2) is the embedding's rows, read from the (lazy) shards."""
    model = _llama_model(_llama_args())
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32}
    path = _llama_write_shards(model, tmp_path / "meta", 2, llama3=False, params=params)
    assert tl.read_args(path).vocab_size == 96
