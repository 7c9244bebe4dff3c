/* The native encoder: tiktoken's algorithm for the two named patterns, in C (tokenizers_bpe._native_bpe).

   encode(text) splits text into pieces exactly as the GPT-2 or GPT-4 (cl100k) pattern regex does, with
   the regex written out as a hand-made scanner over the UTF-8 bytes, then turns each piece into ids:
   a piece that is a token is that token; otherwise its bytes start as single-byte tokens and the
   adjacent pair whose concatenation has the lowest rank (leftmost on ties) is merged until no pair is a
   token. Short pieces use tiktoken's simple scan; long ones a segment tree, so one 1 MB piece
   stays O(n log n). The character classes (\p{L}, \p{N}, \s) are tiktoken's regex engine's own, written
   into _unicode_classes.h by tools/unicode_classes.py. The GIL is released while a text is encoded,
   so encode_batch runs on threads. tokenizers_bpe.tokenizer is the only user; the pure-Python
   encoder (pybpe.py) is the reference the tests hold this to. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { UC_OTHER = 0, UC_L = 1, UC_N = 2, UC_WS = 3 };
struct class_range { uint32_t first, last; unsigned char cls; };
#include "_unicode_classes.h"

enum { PATTERN_GPT2 = 0, PATTERN_GPT4 = 1 };
#define NO_RANK UINT32_MAX
#define SIMPLE_MERGE_MAX 64 /* pieces up to this many bytes merge by tiktoken's scan; longer by a tree */

static unsigned char BMP_CLASS[0x10000]; /* filled at import from the tables */

static int class_above_bmp(uint32_t cp) {
    int lo = 0, hi = N_CLASS_RANGES - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < CLASS_RANGES[mid].first) hi = mid - 1;
        else if (cp > CLASS_RANGES[mid].last) lo = mid + 1;
        else return CLASS_RANGES[mid].cls;
    }
    return UC_OTHER;
}

/* ------------------------------------------------------------------------------- UTF-8 scanning */
typedef struct {
    const unsigned char *s;
    size_t n;
} Text;

/* The class of the character at byte i (valid UTF-8: Python made it) and its length in bytes. */
static inline int char_at(const Text *t, size_t i, int *len) {
    unsigned char c = t->s[i];
    if (c < 0x80) { *len = 1; return ASCII_CLASS[c]; }
    uint32_t cp;
    if (c < 0xE0) { *len = 2; cp = ((uint32_t)(c & 0x1F) << 6) | (t->s[i + 1] & 0x3F); }
    else if (c < 0xF0) {
        *len = 3;
        cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(t->s[i + 1] & 0x3F) << 6) | (t->s[i + 2] & 0x3F);
    } else {
        *len = 4;
        cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(t->s[i + 1] & 0x3F) << 12) |
             ((uint32_t)(t->s[i + 2] & 0x3F) << 6) | (t->s[i + 3] & 0x3F);
        return class_above_bmp(cp);
    }
    return BMP_CLASS[cp];
}

static inline int class_at(const Text *t, size_t i) {
    int len;
    return i < t->n ? char_at(t, i, &len) : -1;
}

/* The end of the run of characters of class cls that starts at i. */
static inline size_t run_end(const Text *t, size_t i, int cls) {
    int len;
    while (i < t->n && char_at(t, i, &len) == cls) i += len;
    return i;
}

/* The end of the contraction ('s 't 're 've 'm 'll 'd) at i, or 0. GPT-4's is case-insensitive, where
   the regex engine's case folding also takes U+017F (long s, "\xC5\xBF") for s. */
static size_t contraction_end(const Text *t, size_t i, int ignore_case) {
    const unsigned char *s = t->s;
    size_t n = t->n;
    if (s[i] != '\'' || i + 1 >= n) return 0;
    unsigned char a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
    if (ignore_case) {
        if (a == 0xC5 && b == 0xBF) return i + 3;
        if (a >= 'A' && a <= 'Z') a += 32;
        if (b >= 'A' && b <= 'Z') b += 32;
    }
    if (a == 's' || a == 'd' || a == 'm' || a == 't') return i + 2;
    if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return i + 3;
    return 0;
}

/* The whitespace alternatives, for a run of whitespace at i (GPT-4 adds \s*[\r\n]):
   \s++$  (the run reaches the end), [\s*[\r\n]  (up to its last line break),] \s+(?!\S)  (all of it
   but its last character, when that leaves one), \s  (one character). */
static size_t whitespace_end(const Text *t, size_t i, int line_breaks) {
    size_t j = i, last = i, after_break = 0;
    int len, chars = 0;
    while (j < t->n && char_at(t, j, &len) == UC_WS) {
        if (line_breaks && (t->s[j] == '\r' || t->s[j] == '\n')) after_break = j + 1;
        last = j;
        j += len;
        chars++;
    }
    if (j == t->n) return j;
    if (after_break) return after_break;
    if (chars >= 2) return last;
    return j;
}

/* ' ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++' after the contractions, then the whitespace. */
static size_t gpt2_piece_end(const Text *t, size_t i) {
    size_t e = contraction_end(t, i, 0);
    if (e) return e;
    int len, cls = char_at(t, i, &len);
    if (t->s[i] == ' ') {
        int next = class_at(t, i + 1);
        if (next >= 0 && next != UC_WS) return run_end(t, i + 1, next);
    }
    if (cls != UC_WS) return run_end(t, i, cls);
    return whitespace_end(t, i, 0);
}

/* '[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+' after the contractions, then
   the whitespace. */
static size_t gpt4_piece_end(const Text *t, size_t i) {
    size_t e = contraction_end(t, i, 1);
    if (e) return e;
    int len, cls = char_at(t, i, &len);
    if (cls == UC_L) return run_end(t, i, UC_L);
    if (cls != UC_N && t->s[i] != '\r' && t->s[i] != '\n' && class_at(t, i + len) == UC_L)
        return run_end(t, i + len, UC_L);
    if (cls == UC_N) {
        size_t j = i + len;
        for (int k = 1; k < 3 && j < t->n && char_at(t, j, &len) == UC_N; k++) j += len;
        return j;
    }
    size_t j = 0;
    if (t->s[i] == ' ' && class_at(t, i + 1) == UC_OTHER) j = run_end(t, i + 1, UC_OTHER);
    else if (cls == UC_OTHER) j = run_end(t, i, UC_OTHER);
    if (j) {
        while (j < t->n && (t->s[j] == '\r' || t->s[j] == '\n')) j++;
        return j;
    }
    return whitespace_end(t, i, 1);
}

/* ------------------------------------------------------------------------------- the ranks */
typedef struct {
    PyObject_HEAD
    int pattern;
    uint32_t n_tokens;
    unsigned char *bytes;   /* every token's bytes, one after another */
    size_t *offset;         /* [n_tokens + 1]: token r is bytes[offset[r]:offset[r + 1]] */
    uint32_t *slots;        /* open addressing: rank + 1, 0 = empty */
    uint32_t *slot_hash;
    size_t mask;
    size_t max_len;         /* the longest token: a longer span is no token, without hashing it */
    uint32_t byte_rank[256];
    uint32_t *pair_ranks;   /* [65536]: the rank of each two-byte token, the first lookups of every merge */
} Encoder;

static inline uint64_t hash_bytes(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0x100000001b3ULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    h = (h ^ w) * 0x100000001b3ULL;
    h ^= h >> 32;
    h *= 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 29);
}

static inline uint32_t rank_of(const Encoder *e, const unsigned char *p, size_t n) {
    if (n > e->max_len) return NO_RANK;
    uint64_t h = hash_bytes(p, n);
    size_t k = h & e->mask;
    uint32_t h32 = (uint32_t)(h >> 32);
    for (;;) {
        uint32_t r = e->slots[k];
        if (!r) return NO_RANK;
        r--;
        if (e->slot_hash[k] == h32 && e->offset[r + 1] - e->offset[r] == n && memcmp(e->bytes + e->offset[r], p, n) == 0)
            return r;
        k = (k + 1) & e->mask;
    }
}

static inline uint32_t pair_rank(const Encoder *e, unsigned char a, unsigned char b) {
    return e->pair_ranks[(uint32_t)a << 8 | b];
}

/* ------------------------------------------------------------------------------- output */
typedef struct {
    uint32_t *ids;
    size_t len, cap;
} Ids;

static int ids_push(Ids *out, uint32_t id) {
    if (out->len == out->cap) {
        size_t cap = out->cap ? out->cap * 2 : 1024;
        uint32_t *ids = realloc(out->ids, cap * sizeof(uint32_t));
        if (!ids) return -1;
        out->ids = ids;
        out->cap = cap;
    }
    out->ids[out->len++] = id;
    return 0;
}

/* ------------------------------------------------------------------------------- BPE on one piece */
/* tiktoken's scan: parts[k] is where part k starts, pair[k] the rank of parts k and k+1 together. */
static int merge_simple(const Encoder *e, const unsigned char *p, size_t n, Ids *out) {
    uint32_t start[SIMPLE_MERGE_MAX + 1], pair[SIMPLE_MERGE_MAX];
    size_t m = n; /* parts */
    for (size_t k = 0; k <= n; k++) start[k] = (uint32_t)k;
    for (size_t k = 0; k + 1 < m; k++) pair[k] = pair_rank(e, p[k], p[k + 1]);
    for (;;) {
        uint32_t best = NO_RANK;
        size_t at = 0;
        for (size_t k = 0; k + 1 < m; k++)
            if (pair[k] < best) { best = pair[k]; at = k; }
        if (best == NO_RANK) break;
        /* parts at and at+1 become one */
        memmove(start + at + 1, start + at + 2, (m - at - 1) * sizeof(uint32_t));
        memmove(pair + at + 1, pair + at + 2, (m > at + 3 ? m - at - 3 : 0) * sizeof(uint32_t));
        m--;
        if (at + 1 < m) pair[at] = rank_of(e, p + start[at], start[at + 2] - start[at]);
        else if (at < m) pair[at] = NO_RANK;
        if (at > 0) pair[at - 1] = rank_of(e, p + start[at - 1], start[at + 1] - start[at - 1]);
    }
    for (size_t k = 0; k < m; k++) {
        uint32_t r = rank_of(e, p + start[k], start[k + 1] - start[k]);
        if (ids_push(out, r)) return -1;
    }
    return 0;
}

/* The same merges for a long piece, with the lowest (pair rank, position) found by a segment tree
   over the byte positions: a part is named by the byte it starts at, which never changes, and a
   position that starts no part (or whose part has no right neighbour, or whose pair is not a token)
   holds NO_KEY. Each merge changes at most three leaves: O(log n) a merge, so O(n log n) a piece. */
#define NO_KEY UINT64_MAX

static inline void tree_set(uint64_t *tree, size_t leaves, size_t k, uint32_t rank) {
    size_t i = leaves + k;
    tree[i] = rank == NO_RANK ? NO_KEY : ((uint64_t)rank << 32 | k);
    for (i >>= 1; i; i >>= 1) {
        uint64_t m = tree[2 * i] < tree[2 * i + 1] ? tree[2 * i] : tree[2 * i + 1];
        if (tree[i] == m) break; /* nothing above changes */
        tree[i] = m;
    }
}

static int merge_tree(const Encoder *e, const unsigned char *p, size_t n, Ids *out) {
    size_t leaves = 1;
    while (leaves < n) leaves <<= 1;
    uint32_t *next = malloc((n + 1) * sizeof(uint32_t)), *prev = malloc(n * sizeof(uint32_t));
    uint64_t *tree = malloc(2 * leaves * sizeof(uint64_t));
    int rc = -1;
    if (!next || !prev || !tree) goto done;
    for (size_t k = 0; k < leaves; k++) {
        uint32_t r = k + 1 < n ? pair_rank(e, p[k], p[k + 1]) : NO_RANK;
        tree[leaves + k] = r == NO_RANK ? NO_KEY : ((uint64_t)r << 32 | k);
    }
    for (size_t i = leaves; --i > 0;)
        tree[i] = tree[2 * i] < tree[2 * i + 1] ? tree[2 * i] : tree[2 * i + 1];
    for (size_t k = 0; k < n; k++) {
        next[k] = (uint32_t)(k + 1);
        prev[k] = k ? (uint32_t)(k - 1) : UINT32_MAX;
    }
    while (tree[1] != NO_KEY) {
        uint32_t a = (uint32_t)tree[1], b = next[a]; /* b is absorbed into a */
        next[a] = next[b];
        if (next[a] < n) prev[next[a]] = a;
        tree_set(tree, leaves, b, NO_RANK);
        tree_set(tree, leaves, a, next[a] < n ? rank_of(e, p + a, next[next[a]] - a) : NO_RANK);
        if (prev[a] != UINT32_MAX) tree_set(tree, leaves, prev[a], rank_of(e, p + prev[a], next[a] - prev[a]));
    }
    for (uint32_t k = 0; k < n; k = next[k])
        if (ids_push(out, rank_of(e, p + k, next[k] - k))) goto done;
    rc = 0;
done:
    free(next);
    free(prev);
    free(tree);
    return rc;
}

static int encode_piece(const Encoder *e, const unsigned char *p, size_t n, Ids *out) {
    if (n == 1) return ids_push(out, e->byte_rank[p[0]]);
    uint32_t r = rank_of(e, p, n);
    if (r != NO_RANK) return ids_push(out, r);
    return n <= SIMPLE_MERGE_MAX ? merge_simple(e, p, n, out) : merge_tree(e, p, n, out);
}

#define MAX_PIECE ((size_t)1 << 31) /* the merges index a piece's bytes with 32 bits */

/* 0, or -1 (out of memory), or -2 (a piece longer than MAX_PIECE). */
static int encode_text(const Encoder *e, const Text *t, Ids *out) {
    size_t i = 0;
    while (i < t->n) {
        size_t j = e->pattern == PATTERN_GPT2 ? gpt2_piece_end(t, i) : gpt4_piece_end(t, i);
        if (j - i >= MAX_PIECE) return -2;
        if (encode_piece(e, t->s + i, j - i, out)) return -1;
        i = j;
    }
    return 0;
}

/* ------------------------------------------------------------------------------- Python */
static void Encoder_dealloc(Encoder *self) {
    free(self->bytes);
    free(self->offset);
    free(self->slots);
    free(self->slot_hash);
    free(self->pair_ranks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Encoder(tokens, pattern): tokens = the bytes of each token in rank order (the 256 single bytes among
   them, each token once), pattern = 0 (GPT-2) or 1 (GPT-4). */
static int Encoder_init(Encoder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tokens", "pattern", NULL};
    PyObject *tokens;
    int pattern;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi", kwlist, &tokens, &pattern)) return -1;
    if (pattern != PATTERN_GPT2 && pattern != PATTERN_GPT4) {
        PyErr_SetString(PyExc_ValueError, "pattern must be 0 (GPT-2) or 1 (GPT-4)");
        return -1;
    }
    if (self->slots) {
        PyErr_SetString(PyExc_TypeError, "an Encoder is initialised once");
        return -1;
    }
    PyObject *seq = PySequence_Fast(tokens, "tokens must be a sequence of bytes");
    if (!seq) return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (count < 256 || count >= (Py_ssize_t)UINT32_MAX / 4) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "tokens must hold the 256 single bytes and at most 2**30 tokens");
        return -1;
    }
    size_t total = 0;
    for (Py_ssize_t r = 0; r < count; r++) {
        PyObject *tok = PySequence_Fast_GET_ITEM(seq, r);
        if (!PyBytes_Check(tok) || PyBytes_GET_SIZE(tok) == 0) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "every token must be non-empty bytes");
            return -1;
        }
        total += PyBytes_GET_SIZE(tok);
        if ((size_t)PyBytes_GET_SIZE(tok) > self->max_len) self->max_len = PyBytes_GET_SIZE(tok);
    }
    size_t cap = 1;
    while (cap < 2 * (size_t)count) cap <<= 1;
    self->pattern = pattern;
    self->n_tokens = (uint32_t)count;
    self->bytes = malloc(total ? total : 1);
    self->offset = malloc((count + 1) * sizeof(size_t));
    self->slots = calloc(cap, sizeof(uint32_t));
    self->slot_hash = calloc(cap, sizeof(uint32_t));
    self->pair_ranks = malloc(65536 * sizeof(uint32_t));
    self->mask = cap - 1;
    if (!self->bytes || !self->offset || !self->slots || !self->slot_hash || !self->pair_ranks) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (int b = 0; b < 256; b++) self->byte_rank[b] = NO_RANK;
    for (int k = 0; k < 65536; k++) self->pair_ranks[k] = NO_RANK;
    size_t at = 0;
    for (Py_ssize_t r = 0; r < count; r++) {
        PyObject *tok = PySequence_Fast_GET_ITEM(seq, r);
        size_t n = PyBytes_GET_SIZE(tok);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(tok);
        memcpy(self->bytes + at, p, n);
        self->offset[r] = at;
        at += n;
        self->offset[r + 1] = at;
        if (rank_of(self, p, n) != NO_RANK) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "the same token bytes appear twice");
            return -1;
        }
        uint64_t h = hash_bytes(p, n);
        size_t k = h & self->mask;
        while (self->slots[k]) k = (k + 1) & self->mask;
        self->slots[k] = (uint32_t)r + 1;
        self->slot_hash[k] = (uint32_t)(h >> 32);
        if (n == 1) self->byte_rank[p[0]] = (uint32_t)r;
        if (n == 2) self->pair_ranks[(uint32_t)p[0] << 8 | p[1]] = (uint32_t)r;
    }
    Py_DECREF(seq);
    for (int b = 0; b < 256; b++)
        if (self->byte_rank[b] == NO_RANK) {
            PyErr_Format(PyExc_ValueError, "byte %d is not a token (byte-level BPE needs all 256)", b);
            return -1;
        }
    return 0;
}

static PyObject *Encoder_encode(Encoder *self, PyObject *arg) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "encode() takes a str");
        return NULL;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(arg, &n); /* a UnicodeEncodeError for lone surrogates */
    if (!s) return NULL;
    Text t = {(const unsigned char *)s, (size_t)n};
    Ids out = {NULL, 0, 0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = encode_text(self, &t, &out);
    Py_END_ALLOW_THREADS
    if (rc) {
        free(out.ids);
        if (rc == -2) {
            PyErr_SetString(PyExc_ValueError, "the text holds a piece (a run without a break) of 2 GiB or more");
            return NULL;
        }
        return PyErr_NoMemory();
    }
    PyObject *list = PyList_New((Py_ssize_t)out.len);
    if (list) {
        for (size_t k = 0; k < out.len; k++) {
            PyObject *v = PyLong_FromUnsignedLong(out.ids[k]);
            if (!v) { Py_CLEAR(list); break; }
            PyList_SET_ITEM(list, (Py_ssize_t)k, v);
        }
    }
    free(out.ids);
    return list;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O,
     "encode(text) -> list[int]: the ids of text, special-token strings taken as ordinary text."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tokenizers_bpe._native_bpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(tokens, pattern): byte-level BPE with the GPT-2 (0) or GPT-4 (1) pattern.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native_bpe", "The native BPE encoder (see _native_bpe.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__native_bpe(void) {
    for (uint32_t c = 0; c < 0x80; c++) BMP_CLASS[c] = ASCII_CLASS[c];
    for (int k = 0; k < N_CLASS_RANGES && CLASS_RANGES[k].first < 0x10000; k++)
        for (uint32_t c = CLASS_RANGES[k].first; c <= CLASS_RANGES[k].last && c < 0x10000; c++)
            BMP_CLASS[c] = CLASS_RANGES[k].cls;
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
