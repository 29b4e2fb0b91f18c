"""The LLaMA tokenizers, written by hand (no sentencepiece, no tiktoken, no regex package).

load_tokenizer(path) reads a tokenizer.model and picks the format from its content:
  - SentencePieceTokenizer: a SentencePiece ModelProto (LLaMA-1/2): score-ordered BPE over characters, with
    a dummy prefix and byte fallback. Only the options LLaMA's files use are accepted; others are refused.
  - TiktokenTokenizer: a tiktoken rank file (Llama 3): the regex pre-tokenizer LLAMA3_PATTERN, then
    rank-ordered byte-level BPE, with the 256 special tokens appended after the ranks.
Each has encode(text, bos, eos) -> ids, decode(ids) -> text, n_words, bos_id, eos_id, pad_id (None if absent)
and stop_ids (ids that end a generation). encode() treats its text as plain text: a string such as
"<|eot_id|>" or "<s>" inside the text is tokenized as ordinary characters, never as the special token (add
specials by id). Both agree id for id with sentencepiece / tiktoken on Meta's files.

Also here: train_tiny_tokenizer (a small byte-level BPE for the demo) and, at the end, the writers that tests
and bench.py use to build SentencePiece files.
"""
import base64
import functools
import heapq
import re
import struct
import sys
import unicodedata

# The Llama 3 pre-tokenizer, as tiktoken (and the regex crate) read it. TiktokenTokenizer runs it with Python's
# re (see _python_re); tests and bench.py hand it to tiktoken itself.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIAL_TOKENS = (["<|begin_of_text|>", "<|end_of_text|>"]
                         + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                         + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
                            "<|eot_id|>"]
                         + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])  # 256 names


def load_tokenizer(path):
    """The tokenizer in the file at path, its format read from its content."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:1] in (b"\x0a", b"\x12", b"\x1a"):  # protobuf key of field 1, 2 or 3, length-delimited
        return SentencePieceTokenizer(path)
    if re.match(rb"[A-Za-z0-9+/=]+ [0-9]+\r?(\n|$)", head):
        return TiktokenTokenizer(path)
    raise ValueError(f"{path}: neither a SentencePiece model (protobuf) nor a tiktoken rank file "
                     f"('<base64> <rank>' lines); it starts with {head[:40]!r}")

# -----------------------------------------------------------------------------
# BPE and the shared base


def bpe(symbols, priority):
    """Merge adjacent symbols, best pair first, until no pair is in the vocabulary.

    symbols: list of str (SentencePiece) or bytes (tiktoken); priority: {piece: number}, higher merges
    first (score for SentencePiece, -rank for tiktoken); ties go to the leftmost pair, as both reference
    implementations do. A heap with lazy deletion keeps long inputs O(n log n)."""
    n = len(symbols)
    if n < 2:
        return symbols
    sym, nxt, prv = list(symbols), list(range(1, n + 1)), list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        p = priority.get(sym[i] + sym[i + 1])
        if p is not None:
            heap.append((-p, i, sym[i] + sym[i + 1]))
    heapq.heapify(heap)
    while heap:
        _, i, merged = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] is None or j >= n or sym[i] + sym[j] != merged:
            continue  # stale: one side was merged into something else since this pair was pushed
        sym[i], sym[j] = merged, None
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        for a, b in ((prv[i], i), (i, nxt[i])):
            if a >= 0 and b < n:
                p = priority.get(sym[a] + sym[b])
                if p is not None:
                    heapq.heappush(heap, (-p, a, sym[a] + sym[b]))
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
    stop_ids) and defines _chunks(text) -> the pieces that are encoded independently, _encode_chunk(chunk)
    -> ids, and _decode(ids) -> text."""

    def __init__(self, path):
        self.path = str(path)
        # Chunk -> ids cache: words repeat, so a large corpus costs little more than its distinct words.
        # (A plain dict, so a tokenizer still pickles, e.g. into DataLoader workers.)
        self._cache = {}

    def encode(self, text, bos, eos):
        """text -> token ids, with the begin-of-text id first if bos and the end-of-text id last if eos.
        Special-token strings in text are plain text here."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for chunk in self._chunks(text):
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
            raise ValueError(f"{what}: truncated varint at byte {i} (corrupt protobuf)")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError(f"{what}: varint longer than 10 bytes at byte {i} (corrupt protobuf)")


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
                raise ValueError(f"{what}: field {field} needs {size} bytes at byte {i}, "
                                 f"only {len(buf) - i} left (truncated protobuf)")
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"{what}: unsupported protobuf wire type {wire} (field {field}) "
                             f"before byte {i} (corrupt protobuf)")
        if field == 0:
            raise ValueError(f"{what}: field number 0 before byte {i} (corrupt protobuf)")
        yield field, value


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
                    raise ValueError(f"{what}: piece {len(self.pieces)} is not a message (corrupt protobuf)")
                piece, score, kind = None, 0.0, _SP_NORMAL
                for f, v in _pb_fields(value, f"{what}: piece {len(self.pieces)}"):
                    if f == 1 and isinstance(v, bytes):
                        try:
                            piece = v.decode("utf-8")
                        except UnicodeDecodeError:
                            raise ValueError(f"{what}: piece {len(self.pieces)} is not UTF-8: {v[:40]!r}") from None
                    elif f == 2 and isinstance(v, bytes) and len(v) == 4:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and isinstance(v, int):
                        kind = v
                if piece is None:
                    raise ValueError(f"{what}: piece {len(self.pieces)} has no piece string")
                self.pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif field in (2, 3) and isinstance(value, bytes):
                spec = trainer if field == 2 else normalizer
                spec.update(_pb_fields(value, f"{what}: {'trainer' if field == 2 else 'normalizer'}_spec"))
        if not self.pieces:
            raise ValueError(f"{what}: SentencePiece model without pieces")
        # LLaMA's settings, refused otherwise (proto defaults in brackets): BPE (UNIGRAM), identity normaliser,
        # whitespace escaped as U+2581 (yes) and as a prefix (yes), dummy prefix on (on), extra whitespace kept
        # (removed), byte fallback on (off).
        for name, value, llama in (("model_type (2 = BPE)", trainer.get(3, 1), 2),
                                   ("precompiled_charsmap (e.g. NFKC)", bool(normalizer.get(2)), False),
                                   ("escape_whitespaces", bool(normalizer.get(5, 1)), True),
                                   ("treat_whitespace_as_suffix", bool(trainer.get(24, 0)), False),
                                   ("add_dummy_prefix", bool(normalizer.get(3, 1)), True),
                                   ("remove_extra_whitespaces", bool(normalizer.get(4, 1)), False),
                                   ("byte_fallback", bool(trainer.get(35, 0)), True)):
            if value != llama:
                raise ValueError(f"{what}: SentencePiece {name} = {value}; only LLaMA's setting, {llama}, "
                                 f"is supported")
        self._unk_surface = trainer.get(44, " \u2047 ".encode()).decode("utf-8")  # what decode shows for <unk>
        self.n_words = len(self.pieces)
        ids = {}
        for name, field, default in (("unk_id", 40, 0), ("bos_id", 41, 1), ("eos_id", 42, 2), ("pad_id", 43, -1)):
            i = _pb_int32(trainer.get(field, default))
            if not -1 <= i < self.n_words:
                raise ValueError(f"{what}: {name} {i} out of range for {self.n_words} pieces")
            ids[name] = None if i == -1 else i
        for name in ("unk_id", "bos_id", "eos_id"):
            if ids[name] is None:
                raise ValueError(f"{what}: SentencePiece model without {name} (trainer_spec sets it to -1)")
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = ids["unk_id"], ids["bos_id"], ids["eos_id"], ids["pad_id"]
        self.stop_ids = (self.eos_id,)
        for i, t in enumerate(types):  # LLaMA has neither; sentencepiece treats them specially
            if t not in (_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_BYTE):
                raise ValueError(f"{what}: piece {i} {self.pieces[i]!r} has type {t}; only NORMAL, UNKNOWN, "
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
                    raise ValueError(f"{what}: BYTE piece {i} is {p!r}, expected <0xNN>")
                self._byte_id[int(m.group(1), 16)] = i
        if len(self._byte_id) != 256:
            raise ValueError(f"{what}: byte fallback needs 256 <0xNN> pieces, only {len(self._byte_id)} of 256 exist")
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
def _python_re(pattern):
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
    classes = {r"\p{L}": cls(letters), r"\p{N}": cls(numbers), r"\s": _WHITE_SPACE}
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
                raise ValueError(f"{what}: line {lineno}: expected '<base64 token> <rank>', got {line[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except ValueError as e:
                raise ValueError(f"{what}: line {lineno}: bad base64 token {parts[0][:80]!r} ({e})") from None
            rank = int(parts[1])
            if token in self._rank:
                raise ValueError(f"{what}: line {lineno}: token {token!r} appears twice")
            self._rank[token] = rank
        n = len(self._rank)
        if sorted(self._rank.values()) != list(range(n)):
            raise ValueError(f"{what}: ranks are not exactly 0..{n - 1}")
        missing = [b for b in range(256) if bytes([b]) not in self._rank]
        if missing:
            raise ValueError(f"{what}: byte-level BPE needs all 256 single bytes; {len(missing)} missing "
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
