"""Tests for bench.py: a tiny end-to-end run and its measuring tools."""
import io
import json

import pytest
import torch

from bench import LLAMA_SHAPES, VARIANTS, PeakTensorBytes, file_size
from bench import main as bench_main
from llama import ModelArgs, Transformer
from vit import ViT, ViTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

def _bench_tiny_run(tmp_path, capsys):
    bench_main(["--model", "all", "--vit", "Ti/16", "--image-size", "32", "--batch", "2", "--llama", "tiny",
                "--llama-batch", "2", "--layers", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
                "--tokenizer-vocab", "300", "--json", str(tmp_path / "bench.json")])
    return capsys.readouterr().out, json.loads((tmp_path / "bench.json").read_text())


def test_bench_end_to_end_tiny(tmp_path, capsys):
    out, result = _bench_tiny_run(tmp_path, capsys)
    vit, llama = result["models"]
    assert (vit["model"], llama["model"]) == ("vit", "llama")
    for r in (vit, llama):
        assert [t["variant"] for t in r["train"]] == list(VARIANTS)
        for t in r["train"]:
            assert t["step_s"] > 0 and t["flops"] > 0 and t["peak_bytes"] > 0
            assert t["file_bytes"] >= 4 * t["trainable"]  # fp32 master weights, plus torch.save's framing
        floor = r["train"][0]
        assert floor["x_floor"] == 1.0 and floor["trainable"] == 0 and floor["file_bytes"] == 0
        assert [i["variant"] for i in r["inference"]] == ["base", "gift-unmerged", "gift-merged"]
        assert r["inference"][0]["x_base"] == 1.0 and all(i["forward_s"] > 0 for i in r["inference"])
        for name in VARIANTS + ("gift-merged",):
            assert f"| {name} |" in out
        ops = {t["variant"]: t["ops"] for t in r["train"]}  # aten ops per step, deterministic
        assert ops["floor"] < ops["gift"] <= ops["gift-param"] and ops["gift"] < ops["lora"], ops
        assert r["ops_counted"] == "aten ops" and r["compiled"] is None
    assert "| aten ops |" in out and "ViT-Ti/16" in out
    assert (vit["lora"], llama["lora"]) == ({"rank": 8, "alpha": 1.0}, {"rank": 32, "alpha": 64.0})  # as the scripts
    assert "LoRA r=8 alpha=1 " in out and "LoRA r=32 alpha=64 " in out
    # ViT-Ti/16 (dim 192, 12 blocks): GIFT one Theta on attn.proj, 2*r*d_in; LoRA r=8, r*(d_in+d_out) per block
    vit_n = {t["variant"]: t["trainable"] for t in vit["train"]}
    assert vit_n["gift"] == vit_n["gift-param"] == 2 * 16 * 192
    assert vit_n["lora"] == 12 * 8 * (192 + 192)
    assert vit_n["full"] == sum(p.numel() for p in ViT(ViTConfig.from_name("Ti/16", image_size=32)).parameters())
    # tiny LLaMA (dim 128, 4 heads, 2 KV heads of 32, FFN 352, 2 layers): GIFT one Theta for wq, one for wv
    llama_n = {t["variant"]: t["trainable"] for t in llama["train"]}
    assert llama_n["gift"] == llama_n["gift-param"] == 2 * (2 * 64 * 128)
    assert llama_n["lora"] == 2 * 32 * ((128 + 128) + (128 + 64) + (128 + 64) + (128 + 352) + (352 + 128))
    tiny = ModelArgs(**LLAMA_SHAPES["tiny"], n_layers=2, max_seq_len=16)
    assert llama_n["full"] == sum(p.numel() for p in Transformer(tiny).parameters())
    rows = result["tokenizers"]["rows"]
    ours = [r for r in rows if r["implementation"] == "gift (hand-written)"]
    assert [r["tokenizer"] for r in ours] == ["sentencepiece", "tiktoken"]
    assert all(r["same_ids"] is not False and r["tokens_per_s"] > 0 for r in rows)  # None: reference not installed


def test_bench_variants_flag_keeps_the_floor_and_compile_and_lora_alpha_flags(tmp_path):
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    try:  # aot_eager: dynamo and AOTAutograd without inductor's C++ compilation (seconds, not minutes)
        bench_main(["--model", "llama", "--llama", "tiny", "--layers", "1", "--seq", "8", "--steps", "1", "--warmup",
                    "0", "--variants", "lora", "gift", "--compile", "aot_eager", "--lora-alpha", "8",
                    "--json", str(tmp_path / "b.json")])
    finally:
        torch._dynamo.reset()
    llama, = json.loads((tmp_path / "b.json").read_text())["models"]
    assert [t["variant"] for t in llama["train"]] == ["floor", "gift", "lora"]  # VARIANTS order, floor first
    assert llama["compiled"] == "aot_eager" and llama["lora"]["alpha"] == 8.0
    assert all(t["ops"] > 0 and t["step_s"] > 0 for t in llama["train"])


def test_bench_peak_tensor_bytes_counts_live_storages():
    with PeakTensorBytes() as tracker:
        a = torch.ones(1000)              # 4000 bytes
        b = a * 2                         # 8000 live
        v = b.view(10, 100)               # a view allocates nothing
        b.add_(1)                         # neither does an in-place op
        del a, b, v
        c = torch.zeros(500)              # a, b freed: 2000 live
        c.mul_(3)
    assert (tracker.peak, tracker.now) == (8000, 2000)


def test_bench_file_size_is_torch_save_size():
    state = {"a": torch.randn(7, 3), "b": torch.zeros(11, dtype=torch.bfloat16)}
    buf = io.BytesIO()
    torch.save(state, buf)
    assert file_size(state) == len(buf.getvalue())


def test_bench_lora_is_the_scripts_lora():
    """bench.py measures the LoRA baselines the scripts train: their ranks and alphas, read from the scripts."""
    import train_llama
    import train_vit
    vit = train_vit.parse_args(["--demo", "--method", "lora"])
    llama = train_llama.parse_args(["--demo", "--method", "lora"])
    assert (vit.rank, vit.lora_alpha) == (8, 1.0)
    assert (llama.rank, llama.lora_alpha) == (32, 64.0)
