"""Hand-written tokenizers for the LLaMA family, RoBERTa and BERT (no sentencepiece, tiktoken, tokenizers, regex).

load_tokenizer(path) reads a tokenizer file and picks the format from its content:
  - SentencePieceTokenizer: a SentencePiece ModelProto (LLaMA-1/2): score-ordered BPE over characters, with
    a dummy prefix and byte fallback. Only the options LLaMA's files use are accepted; others are refused.
  - TiktokenTokenizer: a tiktoken rank file (Llama 3): the regex pre-tokenizer LLAMA3_PATTERN, then
    rank-ordered byte-level BPE, with the 256 special tokens appended after the ranks.
  - HFTokenizer: a Hugging Face tokenizer.json with a BPE model, in the two families Llama-architecture models
    use: byte-level BPE (Llama 3, SmolLM2, Qwen2) and SentencePiece-style BPE with byte fallback (Llama-2,
    TinyLlama, Mistral). It runs the file's normalizer, pre-tokenizer, merges and decoder as the tokenizers
    library does (the steps are listed at its section below); BOS, EOS, the stop ids and whether BOS is added
    come from tokenizer_config.json, config.json and generation_config.json beside the file. (RoBERTa's
    tokenizer.json is of the byte-level kind.)
  - WordPieceTokenizer: BERT's tokenizer.json (BertNormalizer, BertPreTokenizer, WordPiece).
Each has encode(text, bos, eos) -> ids, decode(ids) -> text, n_words, bos_id, eos_id, pad_id (None if absent),
stop_ids (every id that ends a generation) and add_bos (whether the model expects BOS first: pass
bos=tok.add_bos). The Meta formats treat text as plain text: a string such as "<|eot_id|>" or "<s>" inside it is
tokenized as ordinary characters (add specials by id); HFTokenizer, as tokenizers does, turns the file's added
tokens found in the text into their ids. Each agrees id for id with sentencepiece / tiktoken / tokenizers on
real files (test_tokenizer.py).

Also here: train_tiny_tokenizer (a small byte-level BPE for the demo) and, at the end, the writers that tests
and bench.py use to build SentencePiece files.
"""
import base64
import functools
import heapq
import json
import os
import re
import struct
import sys
import unicodedata

from fileio import UserError, read_json

# The Llama 3 pre-tokenizer, as tiktoken (and the regex crate) read it. TiktokenTokenizer runs it with Python's
# re (see _python_re); tests and bench.py hand it to tiktoken itself.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIAL_TOKENS = (["<|begin_of_text|>", "<|end_of_text|>"]
                         + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                         + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
                            "<|eot_id|>"]
                         + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])  # 256 names


# -----------------------------------------------------------------------------
# Checked fields: every reader takes what it uses from a file through these, so a wrong type or value is one
# UserError line naming the file, the field, the value found and what was expected (never a KeyError or a
# TypeError deep inside). Generic enough for fileio.py; kept here as tokenizer.py is their only user.
_REQUIRED = object()
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
               list: "a list"}


def _shown(value, limit=60):
    """value as the JSON file spells it, shortened."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list, str, int, float, bool)) \
        or value is None else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is(value, kinds):
    """isinstance, where JSON true/false is not a number and an integer is a number."""
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


class _Json:
    """A JSON value with the file it came from and its place there (model.vocab["<s>"], added_tokens[3].id).
    data_keys: the keys of this object are data (tokens), written in brackets even where they look like names."""
    __slots__ = ("file", "where", "value", "data_keys")

    def __init__(self, file, value, where=""):
        self.file, self.value, self.where, self.data_keys = str(file), value, where, False

    def path(self, key):  # the place of a field or an element
        if isinstance(key, int):
            return f"{self.where}[{key}]"
        if not self.data_keys and re.fullmatch(r"[A-Za-z_]\w*", key):
            return f"{self.where}.{key}" if self.where else key
        return f"{self.where}[{json.dumps(key, ensure_ascii=False)}]"

    def error(self, expected, key):
        """The UserError for the field key: what it holds, and what is expected."""
        return UserError(f"{self.file}: {self.path(key)} is {_shown(self.value[key])}; expected {expected}")

    def get(self, key, kinds, default=_REQUIRED, ok=None, expected=None):
        """The field key (a name in an object, an index in a list), checked: of one of kinds (a type or a tuple),
        and ok(value) if given; expected says what is wanted (by default the kinds). Absent or null: default,
        or an error if there is none. Objects and lists come back as _Json, to read their fields in turn."""
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        expected = expected or " or ".join(_KIND_NAMES[k] for k in kinds)
        value = self.value.get(key) if isinstance(self.value, dict) else self.value[key]
        if value is None:
            if default is _REQUIRED:
                if isinstance(self.value, dict) and key not in self.value:
                    raise UserError(f"{self.file}: {self.path(key)} is missing; expected {expected}")
                raise self.error(expected, key)
            return default
        if not _is(value, kinds) or (ok is not None and not ok(value)):
            raise self.error(expected, key)
        return _Json(self.file, value, self.path(key)) if isinstance(value, (dict, list)) else value

    def fields(self):  # (key, value) of an object, or (index, value) of a list
        return self.value.items() if isinstance(self.value, dict) else enumerate(self.value)

    def each(self, kinds, ok=None, expected=None):
        """Check every value of this object or list as get() does (fast when all are right); returns them."""
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        good = (lambda v: _is(v, kinds)) if ok is None else (lambda v: _is(v, kinds) and ok(v))
        values = self.value.values() if isinstance(self.value, dict) else self.value
        if not all(map(good, values)):
            for key, value in self.fields():
                if not good(value):
                    raise self.error(expected or " or ".join(_KIND_NAMES[k] for k in kinds), key)
        return self.value


def _read_json_object(path):
    """A JSON file that must hold an object, as a _Json; missing, not UTF-8 or malformed: a UserError."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: the file is {_shown(data)}; expected a JSON object")
    return _Json(path, dict(data))


# The bound on a tokenizer.json's ids. The format (u32 ids) allows any id; real files number their tokens 0..n-1
# (added tokens after the vocabulary, or among it), a few leave small gaps. Ids below twice the number of tokens
# the file lists keep the id -> token table (and the embedding rows the ids ask for) proportional to the file.
_ID_BOUND = "(below twice the number of tokens the file lists)"


def _check_ids(vocab, listed):
    """vocab: a tokenizer.json's model.vocab (_Json, token: id); listed: how many tokens the file lists
    (vocabulary and added tokens). Each id must be an integer in [0, 2 * listed), no id twice; returns the bound."""
    bound = 2 * listed
    vocab.data_keys = True
    vocab.each(int, lambda i: 0 <= i < bound, f"a token id, an integer in [0, {bound}) {_ID_BOUND}")
    ids = vocab.value.values()
    if len(set(ids)) != len(ids):
        first = {}
        for token, i in vocab.value.items():
            if i in first:
                raise UserError(f"{vocab.file}: {vocab.path(token)} is {i}, the id of {vocab.path(first[i])} too; "
                                f"expected one token per id")
            first[i] = token
    return bound


def load_tokenizer(path):
    """The tokenizer in the file at path, its format read from its content."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.lstrip()[:1] == b"{":  # an HF tokenizer.json: BPE, or BERT's WordPiece
        kind = _read_json_object(path).get("model", dict).get("type", str)
        return WordPieceTokenizer(path) if kind == "WordPiece" else HFTokenizer(path)
    if head[:1] in (b"\x0a", b"\x12", b"\x1a"):  # protobuf key of field 1, 2 or 3, length-delimited
        return SentencePieceTokenizer(path)
    if re.match(rb"[A-Za-z0-9+/=]+ [0-9]+\r?(\n|$)", head):
        return TiktokenTokenizer(path)
    raise UserError(f"{path}: neither a SentencePiece model (protobuf), a tiktoken rank file ('<base64> "
                     f"<rank>' lines) nor a tokenizer.json; it starts with {head[:40]!r}")

# -----------------------------------------------------------------------------
# BPE and the shared base


def bpe(symbols, priority, pairs=False):
    """Merge adjacent symbols, best pair first, until no pair is in the vocabulary.

    symbols: list of str (SentencePiece, tokenizer.json) or bytes (tiktoken); priority: {piece: number}, higher
    merges first (score for SentencePiece, -rank for tiktoken), or with pairs=True {(left, right): number}
    (-rank in a tokenizer.json's merges, which name the pair, not just what it forms); ties go to the leftmost
    pair, as all three reference implementations do. A heap with lazy deletion keeps long inputs O(n log n)."""
    n = len(symbols)
    if n < 2:
        return symbols
    get = (lambda a, b: priority.get((a, b))) if pairs else (lambda a, b: priority.get(a + b))
    sym, nxt, prv = list(symbols), list(range(1, n + 1)), list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        p = get(sym[i], sym[i + 1])
        if p is not None:
            heap.append((-p, i, sym[i], sym[i + 1]))
    heapq.heapify(heap)
    while heap:
        _, i, a, b = heapq.heappop(heap)
        j = nxt[i]
        if j >= n or sym[i] != a or sym[j] != b:
            continue  # stale: one side was merged into something else since this pair was pushed
        sym[i], sym[j] = a + b, None
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        for a, b in ((prv[i], i), (i, nxt[i])):
            if a >= 0 and b < n:
                p = get(sym[a], sym[b])
                if p is not None:
                    heapq.heappush(heap, (-p, a, sym[a], sym[b]))
    out, i = [], 0
    while i < n:
        out.append(sym[i])
        i = nxt[i]
    return out


def utf8(text):
    """UTF-8 bytes of text; lone surrogates (possible from JSON escapes) become U+FFFD, as in tiktoken."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


class Tokenizer:
    """The shared part: a subclass reads its file in __init__ (setting n_words, bos_id, eos_id, pad_id,
    stop_ids, and add_bos where it is not True) and defines _chunks(text) -> the pieces that are encoded
    independently (or ids already known: an added token of a tokenizer.json), _encode_chunk(chunk) -> ids,
    and _decode(ids) -> text."""
    add_bos = True  # Meta's models are trained with BOS first

    def __init__(self, path):
        self.path = str(path)
        # Chunk -> ids cache: words repeat, so a large corpus costs little more than its distinct words.
        # (A plain dict, so a tokenizer still pickles, e.g. into DataLoader workers.)
        self._cache = {}

    def encode(self, text, bos, eos):
        """text -> token ids, with the begin-of-text id first if bos and the end-of-text id last if eos."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        for flag, name in ((bos, "bos_id"), (eos, "eos_id")):
            if flag and getattr(self, name) is None:
                raise ValueError(f"{self.path}: asked for {name[:3].upper()} but the tokenizer declares none")
        ids = [self.bos_id] if bos else []
        for chunk in self._chunks(text):
            if isinstance(chunk, int):
                ids.append(chunk)
                continue
            chunk_ids = self._cache.get(chunk)
            if chunk_ids is None:
                if len(self._cache) >= 1 << 20:  # bound the memory on endless distinct input
                    self._cache.clear()
                chunk_ids = self._cache[chunk] = self._encode_chunk(chunk)
            ids.extend(chunk_ids)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids):
        """ids -> text; invalid UTF-8 becomes U+FFFD."""
        for i in ids:
            if not 0 <= i < self.n_words:
                raise ValueError(f"decode: token id {i} out of range [0, {self.n_words}) for {self.path}")
        return self._decode(ids)

# -----------------------------------------------------------------------------
# LLaMA-1/2: SentencePiece BPE. The file is a protobuf ModelProto; the reader needs only a few parts of it.


def _pb_varint(buf, i, what):
    value = shift = 0
    while True:
        if i >= len(buf):
            raise UserError(f"{what}: truncated varint at byte {i} (corrupt protobuf)")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise UserError(f"{what}: varint longer than 10 bytes at byte {i} (corrupt protobuf)")


def _pb_fields(buf, what):
    """Yield (field_number, value) of one message: int for varints, bytes for the other wire types."""
    i = 0
    while i < len(buf):
        key, i = _pb_varint(buf, i, what)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _pb_varint(buf, i, what)
        elif wire in (1, 2, 5):
            if wire == 2:
                size, i = _pb_varint(buf, i, what)
            else:
                size = 8 if wire == 1 else 4
            if i + size > len(buf):
                raise UserError(f"{what}: field {field} needs {size} bytes at byte {i}, "
                                 f"only {len(buf) - i} left (truncated protobuf)")
            value, i = buf[i:i + size], i + size
        else:
            raise UserError(f"{what}: unsupported protobuf wire type {wire} (field {field}) "
                             f"before byte {i} (corrupt protobuf)")
        if field == 0:
            raise UserError(f"{what}: field number 0 before byte {i} (corrupt protobuf)")
        yield field, value


def _pb_get(fields, number, name, kind, default, what):
    """Field number (called name) of a message read into a dict {number: value} by _pb_fields, checked to be of
    its kind: "varint" -> int, "float" (fixed32) -> float, "string" (UTF-8) -> str, "bytes"; default if absent."""
    if number not in fields:
        return default
    value = fields[number]
    if kind == "varint" and isinstance(value, int) or kind == "bytes" and isinstance(value, bytes):
        return value
    if kind == "float" and isinstance(value, bytes) and len(value) == 4:
        return struct.unpack("<f", value)[0]
    if kind == "string" and isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{what}: {name} (field {number}) is not UTF-8: {value[:40]!r}") from None
    expected = {"varint": "a varint", "float": "a 4-byte float", "string": "a string", "bytes": "bytes"}[kind]
    shown = repr(value[:40]) if isinstance(value, bytes) else f"the varint {value}"
    raise UserError(f"{what}: {name} (field {number}) is {shown}; expected {expected} (corrupt protobuf)")


def _pb_int32(value):  # varints hold negative int32s as 64-bit two's complement
    return value - (1 << 64) if value >= 1 << 63 else value


_SP_WORDS = re.compile("\u2581*[^\u2581]+|\u2581+")  # a word: its leading U+2581 run and what follows
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_BYTE = 1, 2, 3, 6  # SentencePiece.Type values


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-1/2's tokenizer.model. The text's spaces become U+2581 and one is put in front (the dummy
    prefix); each word is merged by piece score; characters without a piece fall back to their UTF-8 bytes."""

    def __init__(self, path):
        super().__init__(path)
        what = self.path
        with open(path, "rb") as f:
            data = f.read()
        self.pieces, types, scores = [], [], []
        trainer, normalizer = {}, {}
        for field, value in _pb_fields(data, what):
            if field == 1:
                if not isinstance(value, bytes):
                    raise UserError(f"{what}: piece {len(self.pieces)} is not a message (corrupt protobuf)")
                where = f"{what}: piece {len(self.pieces)}"
                fields = dict(_pb_fields(value, where))  # a repeated field: the last one counts, as in protobuf
                self.pieces.append(_pb_get(fields, 1, "piece", "string", None, where))
                scores.append(_pb_get(fields, 2, "score", "float", 0.0, where))
                types.append(_pb_get(fields, 3, "type", "varint", _SP_NORMAL, where))
                if self.pieces[-1] is None:
                    raise UserError(f"{where} has no piece string")
            elif field in (2, 3) and isinstance(value, bytes):
                spec = trainer if field == 2 else normalizer
                spec.update(_pb_fields(value, f"{what}: {'trainer' if field == 2 else 'normalizer'}_spec"))
        if not self.pieces:
            raise UserError(f"{what}: SentencePiece model without pieces")
        t, n = f"{what}: trainer_spec", f"{what}: normalizer_spec"
        # LLaMA's settings, refused otherwise (proto defaults in brackets): BPE (UNIGRAM), identity normaliser,
        # whitespace escaped as U+2581 (yes) and as a prefix (yes), dummy prefix on (on), extra whitespace kept
        # (removed), byte fallback on (off).
        for name, value, llama in (("model_type (2 = BPE)", _pb_get(trainer, 3, "model_type", "varint", 1, t), 2),
                                   ("precompiled_charsmap (e.g. NFKC)",
                                    bool(_pb_get(normalizer, 2, "precompiled_charsmap", "bytes", b"", n)), False),
                                   ("escape_whitespaces",
                                    bool(_pb_get(normalizer, 5, "escape_whitespaces", "varint", 1, n)), True),
                                   ("treat_whitespace_as_suffix",
                                    bool(_pb_get(trainer, 24, "treat_whitespace_as_suffix", "varint", 0, t)), False),
                                   ("add_dummy_prefix",
                                    bool(_pb_get(normalizer, 3, "add_dummy_prefix", "varint", 1, n)), True),
                                   ("remove_extra_whitespaces",
                                    bool(_pb_get(normalizer, 4, "remove_extra_whitespaces", "varint", 1, n)), False),
                                   ("byte_fallback",
                                    bool(_pb_get(trainer, 35, "byte_fallback", "varint", 0, t)), True)):
            if value != llama:
                raise UserError(f"{what}: SentencePiece {name} = {value}; only LLaMA's setting, {llama}, "
                                f"is supported")
        # what decode shows for <unk>
        self._unk_surface = _pb_get(trainer, 44, "unk_surface", "string", " \u2047 ", t)
        self.n_words = len(self.pieces)
        ids = {}
        for name, field, default in (("unk_id", 40, 0), ("bos_id", 41, 1), ("eos_id", 42, 2), ("pad_id", 43, -1)):
            i = _pb_int32(_pb_get(trainer, field, name, "varint", default, t))
            if not -1 <= i < self.n_words:
                raise UserError(f"{what}: {name} {i} out of range for {self.n_words} pieces")
            ids[name] = None if i == -1 else i
        for name in ("unk_id", "bos_id", "eos_id"):
            if ids[name] is None:
                raise UserError(f"{what}: SentencePiece model without {name} (trainer_spec sets it to -1)")
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = ids["unk_id"], ids["bos_id"], ids["eos_id"], ids["pad_id"]
        self.stop_ids = (self.eos_id,)
        for i, t in enumerate(types):  # LLaMA has neither; sentencepiece treats them specially
            if t not in (_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_BYTE):
                raise UserError(f"{what}: piece {i} {self.pieces[i]!r} has type {t}; only NORMAL, UNKNOWN, "
                                 f"CONTROL and BYTE pieces are supported")
        # Merges may only form NORMAL pieces (sentencepiece keeps control, unknown and byte pieces out of
        # its merge table); the BPE picks the highest score.
        self._piece_id = {p: i for i, (p, t) in enumerate(zip(self.pieces, types)) if t == _SP_NORMAL}
        self._score = {p: scores[i] for p, i in self._piece_id.items()}
        self._byte_id = {}
        for i, (p, t) in enumerate(zip(self.pieces, types)):
            if t == _SP_BYTE:
                m = re.fullmatch(r"<0x([0-9A-F]{2})>", p)
                if m is None:
                    raise UserError(f"{what}: BYTE piece {i} is {p!r}, expected <0xNN>")
                self._byte_id[int(m.group(1), 16)] = i
        if len(self._byte_id) != 256:
            raise UserError(f"{what}: byte fallback needs 256 <0xNN> pieces, only {len(self._byte_id)} of 256 exist")
        self._types = types
        # Splitting the text before each run of U+2581 lets each word be merged (and cached) alone. That is
        # exact only if no piece can straddle the cut, i.e. no piece holds "x\u2581" with x != U+2581.
        self._glue = {p[k - 1] for p in self._piece_id for k in range(1, len(p))
                      if p[k] == "\u2581" and p[k - 1] != "\u2581"}

    def _chunks(self, text):
        if not text:
            return []
        words = _SP_WORDS.findall("\u2581" + text.replace(" ", "\u2581"))  # the dummy prefix, then the text
        if not self._glue:  # LLaMA's vocabulary: every word stands alone
            return words
        chunks = []
        for chunk in words:
            if chunks and chunks[-1][-1] in self._glue:
                chunks[-1] += chunk
            else:
                chunks.append(chunk)
        return chunks

    def _encode_chunk(self, chunk):
        ids = []
        for piece in bpe(list(chunk), self._score):
            i = self._piece_id.get(piece)
            ids.extend([i] if i is not None else [self._byte_id[b] for b in utf8(piece)])
        return ids

    def _decode(self, ids):
        # sentencepiece's rules: control tokens vanish, U+2581 -> space; a run of byte pieces is decoded on
        # its own, one U+FFFD per invalid byte; the dummy prefix's U+2581 is dropped from the first normal
        # piece while no text has come out yet.
        parts, run, strip = [], bytearray(), True
        for i in [*ids, None]:
            if i is not None and self._types[i] == _SP_BYTE:
                run.append(int(self.pieces[i][3:5], 16))
                continue
            if run:
                text = bytes(run).decode("utf-8", errors="surrogateescape")  # bad byte -> lone surrogate
                parts.append(re.sub("[\udc80-\udcff]", "\ufffd", text))
                run.clear()
            if i is None:
                break
            if self._types[i] == _SP_UNKNOWN:
                parts.append(self._unk_surface)
            elif self._types[i] == _SP_NORMAL:
                piece = self.pieces[i]
                if strip and not any(parts) and piece.startswith("\u2581"):
                    piece, strip = piece[1:], False
                parts.append(piece.replace("\u2581", " "))
        return "".join(parts)

# -----------------------------------------------------------------------------
# Llama 3: tiktoken byte-level BPE
#
# Python's re has no \p{..}: _python_re spells LLAMA3_PATTERN's \p{L} and \p{N} out as code point ranges
# from unicodedata (L* and N* categories), and \s as Unicode White_Space (re's own \s also takes \x1c-\x1f,
# which the regex crate does not). Alternation, backtracking and the lookahead then behave as in the regex
# crate that tiktoken uses.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=None)
def _letters_numbers():  # the contents of a [...] set for \p{L} and for \p{N}
    letters, numbers = [], []
    for cp in range(sys.maxunicode + 1):
        cat = unicodedata.category(chr(cp))[0]
        ranges = letters if cat == "L" else numbers if cat == "N" else None
        if ranges is not None:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    cls = lambda ranges: "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
    return cls(letters), cls(numbers)


@functools.lru_cache(maxsize=None)
def _python_re(pattern):
    letters, numbers = _letters_numbers()
    classes = {r"\p{L}": letters, r"\p{N}": numbers, r"\s": _WHITE_SPACE}
    out, inside = [], False  # inside a [...] set the ranges go in as they are, outside in their own set
    for token in re.findall(r"\\p\{.\}|\\.|.", pattern):
        inside = token == "[" or (inside and token != "]")
        if token == r"\S":
            out.append(f"[^{_WHITE_SPACE}]")
        elif token in classes:
            out.append(classes[token] if inside else f"[{classes[token]}]")
        else:
            out.append(token)
    return re.compile("".join(out))


def llama3_split(text):
    """The Llama 3 pre-tokenizer: text -> list of pieces, each BPE-encoded on its own."""
    return _python_re(LLAMA3_PATTERN).findall(text)


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tokenizer.model: '<base64 token> <rank>' lines, then Meta's 256 special tokens."""

    def __init__(self, path):
        super().__init__(path)
        what = self.path
        with open(path, "rb") as f:
            data = f.read()
        self._rank = {}
        for lineno, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise UserError(f"{what}: line {lineno}: expected '<base64 token> <rank>', got {line[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except ValueError as e:
                raise UserError(f"{what}: line {lineno}: bad base64 token {parts[0][:80]!r} ({e})") from None
            if len(parts[1]) > 12:  # int() of a long digit string is slow, then refused (4300 digits)
                raise UserError(f"{what}: line {lineno}: rank {parts[1][:40].decode()}... is too large; expected "
                                f"0..(number of tokens - 1)")
            rank = int(parts[1])
            if token in self._rank:
                raise UserError(f"{what}: line {lineno}: token {token!r} appears twice")
            self._rank[token] = rank
        n = len(self._rank)
        if sorted(self._rank.values()) != list(range(n)):
            raise UserError(f"{what}: ranks are not exactly 0..{n - 1}")
        missing = [b for b in range(256) if bytes([b]) not in self._rank]
        if missing:
            raise UserError(f"{what}: byte-level BPE needs all 256 single bytes; {len(missing)} missing "
                             f"(first: {missing[0]:#04x})")
        self._token = [b""] * n
        for token, rank in self._rank.items():
            self._token[rank] = token
        self._neg_rank = {t: -r for t, r in self._rank.items()}
        # Meta's layout: the 256 special tokens follow the ranks (128000.. for the real file).
        self.special_tokens = {name: n + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._special_name = {i: name for name, i in self.special_tokens.items()}
        self.n_words = n + len(LLAMA3_SPECIAL_TOKENS)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.pad_id = None
        self.stop_ids = (self.eos_id, self.eot_id)

    def _chunks(self, text):
        return llama3_split(text)

    def _encode_chunk(self, piece):
        data = utf8(piece)
        rank = self._rank.get(data)
        if rank is not None:  # whole piece is one token: skip the merges (tiktoken's fast path)
            return [rank]
        return [self._rank[t] for t in bpe([bytes([b]) for b in data], self._neg_rank)]

    def _decode(self, ids):  # bytes joined, special tokens by name
        n = len(self._token)
        parts = [self._token[i] if i < n else self._special_name[i].encode() for i in ids]
        return b"".join(parts).decode("utf-8", errors="replace")

# -----------------------------------------------------------------------------
# Hugging Face tokenizer.json (BPE models), as the tokenizers library runs encode(text, add_special_tokens=False)
#
#  1. Added tokens: the file's added_tokens found in the text (leftmost match first, the longest of those) are
#     cut out and become their ids, honouring single_word / lstrip / rstrip. Those marked normalized=false are
#     looked for in the raw text, the others in the text after step 2.
#  2. The normalizer, on each remaining segment: NFC/NFD/NFKC/NFKD, Prepend (a string before a non-empty
#     segment), Replace (a string by a string), or a Sequence of these. Llama-2's older files spell the
#     SentencePiece conventions this way: Prepend("▁") + Replace(" ", "▁"), and no pre-tokenizer.
#  3. The pre-tokenizer splits each segment into words: Metaspace (spaces -> "▁"; a "▁" put in front unless
#     there is one: of every segment with prepend_scheme "always", only of the text's first with "first";
#     split=true cuts before each "▁"), Split (a regex's matches and the text between them, behavior
#     "Isolated"), Digits (each digit, or each run of digits, apart), ByteLevel (a leading space if
#     add_prefix_space, the GPT-2 regex if use_regex, then each UTF-8 byte written as the printable character
#     GPT-2's table gives it, so a byte-level vocabulary is a set of strings), or a Sequence of these.
#  4. The model merges each word pair by pair, the pair listed first in "merges" first (leftmost on ties); with
#     ignore_merges a word that is a token is taken whole. A character without a token becomes its UTF-8
#     bytes' <0xNN> tokens (byte_fallback), else the unk_token (one for a run with fuse_unk), else it is
#     dropped before merging, as tokenizers does (SmolLM2 has no token for bytes such as 0x04).
# decode() maps ids to their tokens' strings (added tokens included, as tokenizers' decode with
# skip_special_tokens=False) and runs the decoder chain: ByteLevel (characters back to bytes), Metaspace ("▁"
# -> " ", dropped in the first token), Replace, ByteFallback (a run of <0xNN> tokens -> its text, or one U+FFFD
# per byte if not UTF-8), Fuse, Strip, or a Sequence of these. Anything else (Unigram, WordLevel, other
# normalizers, pre-tokenizers or decoders, BPE dropout, subword prefixes/suffixes, regexes with classes Python's
# re cannot spell alike) is refused with an error naming it; WordPiece is BERT's class at the end.
# Speed: words go through the base class's cache. A SentencePiece-style segment is one word to tokenizers; it
# is cut before each run of "▁" when no token holds "x▁" (x != "▁"), exact then (see SentencePieceTokenizer).

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's regex


def _byte_chars():
    """GPT-2's bytes_to_unicode: the printable Latin-1 bytes stand for themselves, the other 68 bytes for
    U+0100 onwards, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = iter(range(256, 256 + 68))
    return "".join(chr(b) if b in printable else chr(next(others)) for b in range(256))


_BYTE_CHARS = _byte_chars()  # byte b -> _BYTE_CHARS[b]
_TO_BYTE_CHARS = str.maketrans(dict(zip(map(chr, range(256)), _BYTE_CHARS)))  # for bytes read as Latin-1
_FROM_BYTE_CHARS = {c: b for b, c in enumerate(_BYTE_CHARS)}
_WHITE_SPACE_CHARS = frozenset(re.findall(f"[{_WHITE_SPACE}]", "".join(map(chr, range(0x3001)))))
# The steps each part of the file may hold (besides "Sequence", under the key given first).
_HF_STEPS = {"normalizer": ("normalizers", {"NFC", "NFD", "NFKC", "NFKD", "Prepend", "Replace"}),
             "pre_tokenizer": ("pretokenizers", {"Metaspace", "Split", "Digits", "ByteLevel"}),
             "decoder": ("decoders", {"ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"})}


def _word_char(c):  # the regex crate's \w, which tokenizers' single_word test uses
    return unicodedata.category(c)[0] in "LM" or unicodedata.category(c) in ("Nd", "Nl", "Pc")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json with a BPE model. bos_id, eos_id, pad_id: tokenizer_config.json's
    bos_token / eos_token / pad_token, else config.json's, else generation_config.json's *_token_id (the
    first, for a list); stop_ids: eos_id and every eos_token_id of config.json and generation_config.json;
    add_bos: tokenizer_config.json's add_bos_token, else whether the post_processor's template starts with
    BOS. The files are read from the tokenizer.json's folder; any of them may be absent. n_words: the highest
    id + 1 (the model's embedding may have more rows)."""

    def __init__(self, path):
        super().__init__(path)
        what = self.path
        spec = _read_json_object(what)
        model = spec.get("model", dict)
        if model.get("type", str) != "BPE":
            raise UserError(f"{what}: model type {model.value['type']!r} is not supported; only BPE (byte-level, "
                            f"or SentencePiece-style with byte fallback) is")
        for key, kind in (("dropout", float), ("continuing_subword_prefix", str), ("end_of_word_suffix", str)):
            if model.get(key, kind, None):
                raise UserError(f"{what}: BPE {key} {model.value[key]!r} is not supported")
        needs = " (the BPE model needs a vocab object and a merges list)"
        vocab = model.get("vocab", dict, ok=bool, expected="a non-empty object of token: id" + needs)
        merges = model.get("merges", list, expected="a list" + needs)
        added = spec.get("added_tokens", list, None)
        bound = _check_ids(vocab, len(vocab.value) + (len(added.value) if added else 0))
        self._id = dict(vocab.value)  # token -> id, the model's own (added tokens apart, as in tokenizers)
        merges.each((str, list), lambda m: isinstance(m, str) or len(m) == 2 and all(isinstance(t, str) for t in m),
                    'a merge, "left right" or [left, right]')
        self._rank = {}  # (left, right) -> -rank: bpe() merges the highest first
        for rank, m in enumerate(merges.value):  # "left right", or [left, right] (tokens with spaces)
            pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            if len(pair) != 2 or not (pair[0] in self._id and pair[1] in self._id and pair[0] + pair[1] in self._id):
                raise UserError(f"{what}: merge {rank} {m!r} is not two tokens that join into a token")
            self._rank[pair] = -rank  # a repeated pair keeps its last rank, as in tokenizers
        unk = model.get("unk_token", str, None)
        if unk is not None and unk not in self._id:
            raise UserError(f"{what}: unk_token {unk!r} is not in the vocabulary")
        self._unk_id = self._id.get(unk)
        self._fuse_unk, self._ignore_merges = (model.get(f, bool, False) for f in ("fuse_unk", "ignore_merges"))
        byte_fallback = model.get("byte_fallback", bool, False)
        self._byte_id = {b: self._id.get(f"<0x{b:02X}>") for b in range(256)} if byte_fallback else {}
        self._normalizer = self._steps(spec.get("normalizer", dict, None), "normalizer")
        self._pre = self._steps(spec.get("pre_tokenizer", dict, None), "pre_tokenizer")
        self._decoder = self._steps(spec.get("decoder", dict, None), "decoder")

        token = {i: t for t, i in self._id.items()}  # id -> the string decode() starts from
        self._added_id = {}  # content -> id
        self._added = {}  # the string searched for (normalized content if normalized) -> (id, flags)
        raw, normalized = [], []
        for k in range(len(added.value) if added else 0):
            t = added.get(k, dict)
            i = t.get("id", int, ok=lambda i: 0 <= i < bound, expected=f"a token id, an integer in [0, {bound}) "
                      f"{_ID_BOUND}")
            content = t.get("content", str, ok=bool, expected="a non-empty string")
            special, single_word, lstrip, rstrip = (t.get(f, bool, False)
                                                    for f in ("special", "single_word", "lstrip", "rstrip"))
            other = self._id.get(content, self._added_id.get(content, i))
            if other != i or token.get(i, content) != content:
                says = f"{content!r} is id {other}" if other != i else f"id {i} is {token[i]!r}"
                raise UserError(f"{what}: added token {content!r} has id {i}, the vocabulary says otherwise "
                                f"({says}) at {t.where}; expected one id per token")
            self._added_id[content] = i
            if t.get("normalized", bool, not special):
                content = self._normalize(content)  # looked for, and decoded, as normalized
                normalized.append(content)
            else:
                raw.append(content)
            self._added[content] = (i, single_word, lstrip, rstrip)
            token[i] = content
        self.n_words = max(token) + 1
        self._token = [token.get(i) for i in range(self.n_words)]  # None: no token has that id
        # Leftmost match first; at one place the longest, since re tries the alternatives in order.
        self._raw_added, self._normalized_added = (
            re.compile("|".join(map(re.escape, sorted(c, key=len, reverse=True)))) if c else None
            for c in (raw, normalized))
        self._sp_cut = ("\u2581" in self._id and not any(s["type"] == "ByteLevel" for s in self._pre)
                        and not any(re.search("[^\u2581]\u2581", t) for t in self._id))
        self._read_folder(spec.get("post_processor", dict, None))

    def _steps(self, spec, part):
        """The file's normalizer / pre_tokenizer / decoder (a _Json, or None) -> its steps in order, each a dict
        of the fields checked here, with what they need at run time (compiled regexes, defaults). Plain data,
        so the tokenizer pickles."""
        if spec is None:
            return []
        key, supported = _HF_STEPS[part]
        kind = spec.get("type", str)
        if kind == "Sequence":
            subs = spec.get(key, list)
            return [step for k in range(len(subs.value)) for step in self._steps(subs.get(k, dict), part)]
        if kind not in supported:
            raise UserError(f"{self.path}: {part} {kind!r} is not supported (only {', '.join(sorted(supported))}, "
                            f"and Sequence)")
        step = {"type": kind}
        char = {"ok": lambda c: len(c) == 1, "expected": "one character"}
        if kind == "Prepend":
            step["prepend"] = spec.get("prepend", str)
        elif kind == "Replace":
            pattern = spec.get("pattern", dict)
            if set(pattern.value) != {"String"}:
                raise UserError(f"{self.path}: {part} Replace with pattern {pattern.value!r} is not supported "
                                f"(only a String)")
            step["old"], step["content"] = pattern.get("String", str), spec.get("content", str)
        elif kind == "Metaspace":  # older files: add_prefix_space instead of prepend_scheme, split by default
            step["replacement"] = spec.get("replacement", str, **char)
            scheme = spec.get("prepend_scheme", str, "always", ok=lambda v: v in ("always", "first", "never"),
                              expected='"always", "first" or "never"')
            step["prepend_scheme"] = "never" if spec.get("add_prefix_space", bool, None) is False else scheme
            if part == "pre_tokenizer":
                r = re.escape(step["replacement"])
                step["regex"] = re.compile(f"{r}[^{r}]*|[^{r}]+") if spec.get("split", bool, True) else None
        elif kind == "Split":
            pattern = spec.get("pattern", dict)
            behavior, invert = spec.get("behavior", str, None), spec.get("invert", bool, False)
            if behavior != "Isolated" or invert:
                raise UserError(f"{self.path}: {part} Split with behavior {behavior!r}, invert {invert!r} is not "
                                f"supported (only Isolated, not inverted)")
            regex = pattern.get("Regex", str, None)
            if regex is not None and re.search(r"\\[dDwWbB]", regex):  # Unicode or ASCII: engines differ
                raise UserError(f"{self.path}: {part} Split regex {regex!r} is not supported (\\d, \\w, \\b)")
            try:
                step["regex"] = (_python_re(regex) if regex is not None
                                 else re.compile(re.escape(pattern.get("String", str))))
            except re.error as e:
                raise UserError(f"{self.path}: {part} Split pattern {pattern.value!r} is not supported ({e})") from None
        elif kind == "Digits":
            individual = spec.get("individual_digits", bool, False)
            step = {"type": "Split", "regex": _python_re(r"\p{N}" if individual else r"\p{N}+")}
        elif kind == "ByteLevel" and part == "pre_tokenizer":
            step["add_prefix_space"] = spec.get("add_prefix_space", bool, False)
            step["regex"] = _python_re(GPT2_PATTERN) if spec.get("use_regex", bool, True) else None
        elif kind == "Strip":
            step["content"] = spec.get("content", str, **char)
            step["start"], step["stop"] = (spec.get(f, int, ok=lambda n: n >= 0, expected="an integer >= 0")
                                           for f in ("start", "stop"))
        return [step]

    def _normalize(self, text):
        for s in self._normalizer:
            if s["type"] == "Prepend":
                text = s["prepend"] + text if text else text
            elif s["type"] == "Replace":
                text = text.replace(s["old"], s["content"])
            else:
                text = unicodedata.normalize(s["type"], text)
        return text

    def _cut_added(self, text, regex):
        """text -> [str | id]: the added tokens regex finds become their ids; the text around them stays."""
        if regex is None:
            return [text]
        out, pos = [], 0
        for m in regex.finditer(text):
            i, single_word, lstrip, rstrip = self._added[m.group()]
            start, stop = m.span()
            if single_word and (start > 0 and _word_char(text[start - 1])
                                or stop < len(text) and _word_char(text[stop])):
                continue
            while lstrip and start > pos and text[start - 1] in _WHITE_SPACE_CHARS:
                start -= 1
            while rstrip and stop < len(text) and text[stop] in _WHITE_SPACE_CHARS:
                stop += 1
            out += [text[pos:start], i] if pos < start else [i]
            pos = stop
        return out + [text[pos:]] if pos < len(text) else out

    def _pre_tokenize(self, text, first):
        """A normalized segment -> its words; first: the segment starts the text (for Metaspace's "first")."""
        words = [(text, first)]
        for s in self._pre:
            out = []
            for w, first in words:
                if s["type"] == "Metaspace":
                    w = w.replace(" ", s["replacement"])
                    if not w.startswith(s["replacement"]) and (
                            s["prepend_scheme"] == "always" or s["prepend_scheme"] == "first" and first):
                        w = s["replacement"] + w
                    parts = s["regex"].findall(w) if s["regex"] else [w]
                elif s["type"] == "ByteLevel":
                    if s.get("add_prefix_space") and not w.startswith(" "):
                        w = " " + w
                    parts = [utf8(p).decode("latin-1").translate(_TO_BYTE_CHARS)
                             for p in (s["regex"].findall(w) if s["regex"] else [w])]
                else:  # Split, Isolated: the matches and the text between them
                    parts, pos = [], 0
                    for m in s["regex"].finditer(w):
                        parts += [w[pos:m.start()], m.group()]
                        pos = m.end()
                    parts.append(w[pos:])
                out += [(p, first and k == 0) for k, p in enumerate(p for p in parts if p)]
            words = out
        if self._sp_cut:
            return [chunk for w, _ in words for chunk in _SP_WORDS.findall(w)]
        return [w for w, _ in words]

    def _chunks(self, text):
        out = []
        for k, segment in enumerate(self._cut_added(text, self._raw_added)):
            if isinstance(segment, int):
                out.append(segment)
                continue
            for j, sub in enumerate(self._cut_added(self._normalize(segment), self._normalized_added)):
                out += [sub] if isinstance(sub, int) else self._pre_tokenize(sub, k == 0 and j == 0)
        return out

    def _fallback(self, piece):  # the <0xNN> ids of piece's bytes, or None
        ids = [self._byte_id.get(b) for b in utf8(piece)] if self._byte_id else [None]
        return None if None in ids else ids

    def _encode_chunk(self, word):
        if self._ignore_merges and word in self._id:
            return [self._id[word]]
        symbols = list(word)
        if self._unk_id is None:  # tokenizers drops what it cannot encode before merging
            symbols = [c for c in symbols if c in self._id or self._fallback(c)]
        ids, unk = [], False
        for piece in bpe(symbols, self._rank, pairs=True):
            i = self._id.get(piece)
            fallback = None if i is not None else self._fallback(piece)
            if i is None and fallback is None:  # an unknown character
                if not (unk and self._fuse_unk):
                    ids.append(self._unk_id)
                unk = True
            else:
                ids += [i] if i is not None else fallback
                unk = False
        return ids

    def _decode(self, ids):
        tokens = [self._token[i] for i in ids]
        if None in tokens:
            raise ValueError(f"decode: no token has id {ids[tokens.index(None)]} in {self.path}")
        for s in self._decoder:
            kind = s["type"]
            if kind == "Replace":
                tokens = [t.replace(s["old"], s["content"]) for t in tokens]
            elif kind == "Fuse":
                tokens = ["".join(tokens)]
            elif kind == "Strip":  # up to start / stop copies of content off each token's ends
                c, out = s["content"], []
                for t in tokens:
                    a, b = 0, len(t)
                    while a < min(s["start"], b) and t[a] == c:
                        a += 1
                    while b > a and len(t) - b < s["stop"] and t[b - 1] == c:
                        b -= 1
                    out.append(t[a:b])
                tokens = out
            elif kind == "ByteFallback":
                out, run = [], bytearray()
                for t in [*tokens, None]:
                    if t is not None and len(t) == 6 and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                        run.append(int(t[3:5], 16))
                        continue
                    if run:
                        try:
                            out.append(run.decode("utf-8"))
                        except UnicodeDecodeError:
                            out += ["\ufffd"] * len(run)
                        run.clear()
                    out += [] if t is None else [t]
                tokens = out
            elif kind == "Metaspace":
                first = "" if s["prepend_scheme"] != "never" else " "
                tokens = [t.replace(s["replacement"], " " if k else first) for k, t in enumerate(tokens)]
            else:  # ByteLevel: a token of byte characters -> its bytes (any other token: its UTF-8)
                data = bytearray()
                for t in tokens:
                    data += bytes(_FROM_BYTE_CHARS[c] for c in t) if all(c in _FROM_BYTE_CHARS for c in t) else utf8(t)
                tokens = [data.decode("utf-8", errors="replace")]
        return "".join(tokens) if self._decoder else " ".join(tokens)

    def _read_folder(self, post_processor):
        """bos_id, eos_id, pad_id, stop_ids and add_bos from the JSON files beside the tokenizer.json."""
        folder = os.path.dirname(os.path.abspath(self.path))
        paths = {name: os.path.join(folder, name)
                 for name in ("tokenizer_config.json", "config.json", "generation_config.json")}
        files = {name: _read_json_object(p) if os.path.exists(p) else _Json(p, {}) for name, p in paths.items()}
        tc = files["tokenizer_config.json"]

        def ids(key):  # what tokenizer_config.json names, then every id config.json and generation_config.json give
            name = tc.get(f"{key}_token", (str, dict), None, expected="a token, as a string or an AddedToken object")
            name = name.get("content", str) if isinstance(name, _Json) else name  # also written as an AddedToken
            found = []
            if name is not None:
                found.append(self._added_id.get(name, self._id.get(name)))
                if found[0] is None:
                    raise UserError(f"{folder}/tokenizer_config.json: {key}_token {name!r} is not a token of "
                                    f"{self.path}")
            for file in ("config.json", "generation_config.json"):
                value = files[file].get(f"{key}_token_id", (int, list), None, expected="a token id or a list of them")
                for i in value.each(int) if isinstance(value, _Json) else [] if value is None else [value]:
                    if not (0 <= i < self.n_words and self._token[i] is not None):
                        raise UserError(f"{folder}/{file}: {key}_token_id {i!r} is not a token id of {self.path}")
                    found.append(i)
            return found
        bos, eos, pad = ids("bos"), ids("eos"), ids("pad")
        self.bos_id, self.eos_id, self.pad_id = (found[0] if found else None for found in (bos, eos, pad))
        self.stop_ids = tuple(dict.fromkeys(eos))
        add_bos = tc.get("add_bos_token", bool, None)
        if add_bos is not None:
            self.add_bos = add_bos
        else:  # Llama 3's files: a TemplateProcessing (possibly inside a Sequence) puts BOS first
            self.add_bos = self._template_bos(post_processor)

    def _template_bos(self, post):
        """Whether the post_processor (a _Json, or None) is a TemplateProcessing, possibly inside a Sequence,
        whose single-sequence template starts with the BOS token."""
        if post is None or self.bos_id is None:
            return False
        if post.get("type", str) == "Sequence":
            processors = post.get("processors", list)
            return any(self._template_bos(processors.get(k, dict)) for k in range(len(processors.value)))
        if post.value["type"] != "TemplateProcessing":
            return False
        template = post.get("single", list)
        first = template.get(0, dict) if template.value else None
        special = first.get("SpecialToken", dict, None) if first else None
        name = special.get("id", str) if special else None
        return name is not None and self._added_id.get(name, self._id.get(name)) == self.bos_id

# -----------------------------------------------------------------------------
# BERT: WordPiece, from an HF tokenizer.json
#
# BertNormalizer (drop control characters, whitespace to " ", CJK ideographs as words of their own, then
# strip accents and lowercase as the file says), BertPreTokenizer (split on whitespace, each punctuation
# character a word of its own), then per word the longest vocabulary prefix and "##" pieces after it, or
# [UNK] for the whole word if no split covers it.

_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # BERT's "Chinese character" blocks


def _is_punctuation(c):  # ASCII symbols count too (BERT splits "$" and "^", which are not Unicode P*)
    return (c.isascii() and c.isprintable() and not c.isalnum() and c != " ") or unicodedata.category(c)[0] == "P"


class WordPieceTokenizer(Tokenizer):
    """BERT's tokenizer.json (model WordPiece, normalizer BertNormalizer, pre_tokenizer BertPreTokenizer).
    bos_id, eos_id, pad_id: [CLS], [SEP], [PAD]. Unlike HFTokenizer, added tokens ("[MASK]") in the text are
    plain text."""

    def __init__(self, path):
        super().__init__(path)
        spec = _read_json_object(path)
        model, norm, pre = (spec.get(k, dict, _Json(path, {}, k)) for k in ("model", "normalizer", "pre_tokenizer"))
        kinds = tuple(part.get("type", str, None) for part in (model, norm, pre))
        if kinds != ("WordPiece", "BertNormalizer", "BertPreTokenizer"):
            raise UserError(f"{path}: expected model WordPiece, normalizer BertNormalizer and pre_tokenizer "
                            f"BertPreTokenizer (BERT's tokenizer.json); found {kinds}")
        vocab = model.get("vocab", dict, ok=bool, expected="a non-empty object of token: id")
        added = spec.get("added_tokens", list, None)
        _check_ids(vocab, len(vocab.value) + (len(added.value) if added else 0))
        self.vocab = vocab.value
        self.prefix = model.get("continuing_subword_prefix", str, "##")
        self.max_chars = model.get("max_input_chars_per_word", int, 100, ok=lambda n: n >= 0,
                                   expected="an integer >= 0")
        self.unk_id = self.vocab[model.get("unk_token", str, ok=lambda t: t in self.vocab,
                                           expected="a token of model.vocab")]
        self.clean, self.cjk, self.lower = (norm.get(f, bool, True)
                                            for f in ("clean_text", "handle_chinese_chars", "lowercase"))
        self.strip = norm.get("strip_accents", bool, self.lower)
        self._piece = {i: p for p, i in self.vocab.items()}
        self.n_words = 1 + max(self._piece)
        self.bos_id, self.eos_id, self.pad_id = (self.vocab.get(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        self.stop_ids, self.add_bos = (self.eos_id,), True

    def _chunks(self, text):
        if self.clean:
            text = "".join(" " if c.isspace() else c for c in text
                           if c not in "\0\ufffd" and (unicodedata.category(c)[0] != "C" or c in "\t\n\r"))
        if self.cjk:
            text = "".join(f" {c} " if any(a <= ord(c) <= b for a, b in _CJK) else c for c in text)
        if self.strip:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.lower:
            text = text.lower()
        words = []
        for word in text.split():
            start = 0
            for i, c in enumerate(word):
                if _is_punctuation(c):
                    words += [word[start:i], c] if i > start else [c]
                    start = i + 1
            if start < len(word):
                words.append(word[start:])
        return words

    def _encode_chunk(self, word):
        if len(word) > self.max_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # the longest piece in the vocabulary first
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return ids

    def _decode(self, ids):  # words joined by spaces, "##" pieces glued to the piece before
        return " ".join(self._piece[i] for i in ids).replace(" " + self.prefix, "")

# -----------------------------------------------------------------------------
# Training: the demo's tiny tokenizer


def train_tiny_tokenizer(texts, vocab_size, path):
    """Learn a small byte-level BPE (256 byte tokens + merges, most frequent pair first, ties to the
    smallest bytes) over the Llama 3 pre-tokenizer's pieces of texts, and write it as a tiktoken rank
    file (base64 token, space, rank per line). load_tokenizer(path) then adds the 256 special tokens after
    it. Stops early when no pair is left to merge. Returns path."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size} < 256: the 256 byte tokens come first")
    words = {}
    for text in texts:
        for piece in llama3_split(text):
            word = tuple(bytes([b]) for b in utf8(piece))
            words[word] = words.get(word, 0) + 1
    vocab = [bytes([b]) for b in range(256)]
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if a + b not in known:
            vocab.append(a + b)
            known.add(a + b)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    with open(path, "w", encoding="ascii") as f:
        f.writelines(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(vocab))
    return path

# -----------------------------------------------------------------------------
# Writers (for tests and bench.py): SentencePiece model files


def _pb_encode(fields):
    """Encode [(field_number, value)]: bool/int -> varint, float -> fixed32, str/bytes -> length-delimited."""
    def varint(v):
        v &= (1 << 64) - 1  # negative int32/int64 -> ten bytes, as protobuf does
        out = bytearray()
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
        return bytes(out)
    out = bytearray()
    for field, value in fields:
        if isinstance(value, float):
            out += varint(field << 3 | 5) + struct.pack("<f", value)
        elif isinstance(value, int):  # bool is an int
            out += varint(field << 3) + varint(int(value))
        else:
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            out += varint(field << 3 | 2) + varint(len(data)) + data
    return bytes(out)


def write_sentencepiece_model(path, pieces, trainer_spec=((3, 2), (35, True)),
                              normalizer_spec=((1, "identity"), (3, True), (4, False))):
    """Write a SentencePiece ModelProto. pieces: [(piece, score, type)], type None = field left out
    (NORMAL). The specs are [(field_number, value)] of TrainerSpec / NormalizerSpec; the defaults say
    BPE with byte fallback, identity normalisation, dummy prefix on, extra whitespace kept (as LLaMA)."""
    fields = []
    for piece, score, kind in pieces:
        sub = [(1, piece), (2, float(score))] + ([] if kind is None else [(3, kind)])
        fields.append((1, _pb_encode(sub)))
    if trainer_spec is not None:
        fields.append((2, _pb_encode(trainer_spec)))
    if normalizer_spec is not None:
        fields.append((3, _pb_encode(normalizer_spec)))
    with open(path, "wb") as f:
        f.write(_pb_encode(fields))
    return path
