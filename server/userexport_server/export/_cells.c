/* The export's cell rules in C (cells.py says what they are and hands the columns over): a batch's
 * whole CSV or NDJSON lines.
 *
 * csv_lines(columns, length, lone) -> bytes. Each column is a tuple (kind, validity, offset,
 * values, data, wide): kind MISSING, STRING, BOOL, INT (int64), DATETIME (int64 microseconds, UTC)
 * or JSON (a value's JSON text); `values` is the offsets (STRING, JSON: int64 when `wide`, else
 * int32), the bits (BOOL) or the int64s; `data` the bytes of STRING and JSON. `lone`: the row has
 * one column, whose empty cell is written "" so that the line is not blank.
 *
 * json_lines(columns, tree, length) -> bytes: NDJSON lines, each the object `tree` describes (see
 * tree_node) over the columns; a line whose members are all missing is {}.
 *
 * Each runs without the GIL into one bytes object sized for the worst case, then shrunk. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_json_text.h"

enum { MISSING, STRING, BOOL, INT, DATETIME, JSON };

typedef struct {
    int kind, wide;
    const uint8_t *validity;
    Py_ssize_t offset;
    const uint8_t *values;
    const char *data;
    Py_buffer buffers[3];
} Column;

static int bit(const uint8_t *bits, Py_ssize_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

static int present(const Column *c, Py_ssize_t i) {
    return c->kind != MISSING && (c->validity == NULL || bit(c->validity, c->offset + i));
}

static int64_t offset_at(const Column *c, Py_ssize_t i) {
    return c->wide ? ((const int64_t *)c->values)[c->offset + i] : ((const int32_t *)c->values)[c->offset + i];
}

/* The string rule: the injection guard, quotes doubled, quoted. */
static char *put_string(char *w, const char *s, Py_ssize_t n, int guard) {
    *w++ = '"';
    if (guard && n > 0 && strchr("=+-@\t\r", s[0]) != NULL && s[0] != '\0') *w++ = '\'';
    const char *end = s + n;
    for (const char *q; (q = memchr(s, '"', end - s)) != NULL; s = q + 1) {
        memcpy(w, s, q + 1 - s);
        w += q + 1 - s;
        *w++ = '"';
    }
    memcpy(w, s, end - s);
    w += end - s;
    *w++ = '"';
    return w;
}

static char *put_utf8(char *w, unsigned int c) {
    if (c < 0x80) {
        *w++ = (char)c;
    } else if (c < 0x800) {
        *w++ = (char)(0xC0 | c >> 6), *w++ = (char)(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        *w++ = (char)(0xE0 | c >> 12), *w++ = (char)(0x80 | (c >> 6 & 0x3F)), *w++ = (char)(0x80 | (c & 0x3F));
    } else {
        *w++ = (char)(0xF0 | c >> 18), *w++ = (char)(0x80 | (c >> 12 & 0x3F));
        *w++ = (char)(0x80 | (c >> 6 & 0x3F)), *w++ = (char)(0x80 | (c & 0x3F));
    }
    return w;
}

/* A JSON string literal's text (between its quotes) decoded into `w`; a lone surrogate becomes
 * U+FFFD. The decoded text is never longer than the literal. */
static char *put_decoded(char *w, const char *s, const char *end) {
    while (s < end) {
        const char *q = memchr(s, '\\', end - s);
        if (q == NULL) q = end;
        memcpy(w, s, q - s);
        w += q - s;
        s = q;
        if (s + 1 >= end) break;
        char e = s[1];
        s += 2;
        switch (e) {
        case 'b': *w++ = '\b'; break;
        case 'f': *w++ = '\f'; break;
        case 'n': *w++ = '\n'; break;
        case 'r': *w++ = '\r'; break;
        case 't': *w++ = '\t'; break;
        case 'u': {
            int c = hex4(s, end);
            if (c < 0) { *w++ = '\\', *w++ = 'u'; break; } /* not JSON; kept as written */
            s += 4;
            if (c >= 0xD800 && c <= 0xDBFF && end - s >= 6 && s[0] == '\\' && s[1] == 'u') {
                int low = hex4(s + 2, end);
                if (low >= 0xDC00 && low <= 0xDFFF) {
                    w = put_utf8(w, 0x10000 + ((unsigned)(c - 0xD800) << 10) + (unsigned)(low - 0xDC00));
                    s += 6;
                    break;
                }
            }
            w = put_utf8(w, c >= 0xD800 && c <= 0xDFFF ? 0xFFFD : (unsigned)c);
            break;
        }
        default: *w++ = e; /* " \ / */
        }
    }
    return w;
}

/* A JSON value's cell: a string decoded and then the string rule; an object or list quoted as
 * stored; null nothing; anything else (numbers, booleans) as stored. */
static char *put_json(char *w, const char *s, Py_ssize_t n, char *scratch) {
    if (n == 0) return w;
    if (s[0] == '"' && n >= 2) {
        char *end = put_decoded(scratch, s + 1, s + n - 1);
        return put_string(w, scratch, end - scratch, 1);
    }
    if (s[0] == '{' || s[0] == '[') return put_string(w, s, n, 0);
    if (n == 4 && memcmp(s, "null", 4) == 0) return w;
    memcpy(w, s, n);
    return w + n;
}

static int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }

static char *put_digits(char *w, int64_t value, int width) {
    char digits[24];
    int n = 0;
    do digits[n++] = (char)('0' + value % 10), value /= 10; while (value > 0);
    while (n < width) digits[n++] = '0';
    while (n > 0) *w++ = digits[--n];
    return w;
}

static char *put_int(char *w, int64_t value) {
    if (value < 0) {
        *w++ = '-';
        if (value == INT64_MIN) return memcpy(w, "9223372036854775808", 19), w + 19;
        value = -value;
    }
    return put_digits(w, value, 1);
}

/* ISO 8601 in UTC with milliseconds, floored, and Z; years as chrono's %Y writes them (4 digits,
 * a sign outside 0-9999). */
static char *put_datetime(char *w, int64_t micros) {
    int64_t millis = floor_div(micros, 1000), seconds = floor_div(millis, 1000), days = floor_div(seconds, 86400);
    int64_t in_day = seconds - days * 86400, z = days + 719468;
    int64_t era = floor_div(z, 146097), doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365, doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153, day = doy - (153 * mp + 2) / 5 + 1, month = mp < 10 ? mp + 3 : mp - 9;
    int64_t year = yoe + era * 400 + (month <= 2);
    if (year < 0) *w++ = '-', year = -year;
    else if (year > 9999) *w++ = '+';
    w = put_digits(w, year, 4);
    *w++ = '-', w = put_digits(w, month, 2), *w++ = '-', w = put_digits(w, day, 2);
    *w++ = 'T', w = put_digits(w, in_day / 3600, 2), *w++ = ':', w = put_digits(w, in_day / 60 % 60, 2);
    *w++ = ':', w = put_digits(w, in_day % 60, 2), *w++ = '.', w = put_digits(w, millis - seconds * 1000, 3);
    *w++ = 'Z';
    return w;
}

static char *put_cell(char *w, const Column *c, Py_ssize_t i, char *scratch) {
    if (!present(c, i)) return w;
    switch (c->kind) {
    case STRING: case JSON: {
        int64_t from = offset_at(c, i), to = offset_at(c, i + 1);
        return c->kind == STRING ? put_string(w, c->data + from, to - from, 1)
                                 : put_json(w, c->data + from, to - from, scratch);
    }
    case BOOL:
        return bit(c->values, c->offset + i) ? (memcpy(w, "true", 4), w + 4) : (memcpy(w, "false", 5), w + 5);
    case INT: return put_int(w, ((const int64_t *)c->values)[c->offset + i]);
    case DATETIME: return put_datetime(w, ((const int64_t *)c->values)[c->offset + i]);
    }
    return w;
}

static void release(Column *columns, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++)
        for (int b = 0; b < 3; b++)
            if (columns[i].buffers[b].obj != NULL) PyBuffer_Release(&columns[i].buffers[b]);
    PyMem_Free(columns);
}

static int get_buffer(PyObject *object, Py_buffer *view, const void **pointer, Py_ssize_t need) {
    if (object == Py_None) return need == 0 ? 0 : (PyErr_SetString(PyExc_ValueError, "a buffer is missing"), -1);
    if (PyObject_GetBuffer(object, view, PyBUF_SIMPLE) < 0) return -1;
    if (view->len < need) return PyErr_SetString(PyExc_ValueError, "a buffer is shorter than its column"), -1;
    *pointer = view->buf;
    return 0;
}

static Py_ssize_t text_size(const Column *c, Py_ssize_t length) {
    return c->kind == STRING || c->kind == JSON ? offset_at(c, length) - offset_at(c, 0) : 0;
}

/* The column tuples as Columns (release() frees them), their buffers checked against `length`. */
static Column *get_columns(PyObject *specs, Py_ssize_t length) {
    Py_ssize_t count = PyTuple_GET_SIZE(specs);
    Column *columns = PyMem_Calloc(count ? count : 1, sizeof(Column));
    if (columns == NULL) return (Column *)PyErr_NoMemory();
    for (Py_ssize_t k = 0; k < count; k++) {
        Column *c = &columns[k];
        PyObject *validity, *values, *data;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(specs, k), "iOnOOp", &c->kind, &validity, &c->offset, &values, &data,
                              &c->wide))
            goto error;
        int text = c->kind == STRING || c->kind == JSON;
        Py_ssize_t rows = c->offset + length;
        if (c->kind == MISSING) continue;
        if (validity != Py_None && get_buffer(validity, &c->buffers[0], (const void **)&c->validity, (rows + 7) / 8) < 0)
            goto error;
        if (get_buffer(values, &c->buffers[1], (const void **)&c->values,
                       c->kind == BOOL ? (rows + 7) / 8 : text ? (rows + 1) * (c->wide ? 8 : 4) : rows * 8) < 0)
            goto error;
        if (text) {
            if (get_buffer(data, &c->buffers[2], (const void **)&c->data, offset_at(c, length)) < 0) goto error;
            for (Py_ssize_t i = 0; i < length; i++)
                if (offset_at(c, i + 1) < offset_at(c, i) || offset_at(c, i) < 0) {
                    PyErr_SetString(PyExc_ValueError, "offsets out of order");
                    goto error;
                }
        }
    }
    return columns;
error:
    release(columns, count);
    return NULL;
}

static PyObject *csv_lines(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *specs, *result = NULL;
    Py_ssize_t length;
    int lone;
    if (!PyArg_ParseTuple(args, "O!np", &PyTuple_Type, &specs, &length, &lone)) return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(specs), scratch_size = 0;
    Column *columns = get_columns(specs, length);
    if (columns == NULL) return NULL;
    /* The worst case: every byte of text doubled, plus each cell's quotes and guard, separators. */
    Py_ssize_t bound = length * (count + 4);
    for (Py_ssize_t k = 0; k < count; k++) {
        const Column *c = &columns[k];
        bound += 2 * text_size(c, length) + 32 * length;
        for (Py_ssize_t i = 0; c->kind == JSON && i < length; i++)
            if (offset_at(c, i + 1) - offset_at(c, i) > scratch_size) scratch_size = offset_at(c, i + 1) - offset_at(c, i);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, bound);
    char *scratch = PyMem_Malloc(scratch_size + 1);
    if (out == NULL || scratch == NULL) { Py_XDECREF(out); PyMem_Free(scratch); PyErr_NoMemory(); goto done; }
    char *start = PyBytes_AS_STRING(out), *w = start;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < length; i++) {
        char *row = w;
        for (Py_ssize_t k = 0; k < count; k++) {
            if (k > 0) *w++ = ',';
            w = put_cell(w, &columns[k], i, scratch);
        }
        if (lone && w == row) *w++ = '"', *w++ = '"';
        *w++ = '\r', *w++ = '\n';
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(scratch);
    if (_PyBytes_Resize(&out, w - start) == 0) result = out;
done:
    release(columns, count);
    return result;
}

/* NDJSON: a line's object is a tree of members (tree_node); a leaf reads one column. */
typedef struct Node Node;
typedef struct {
    const char *key; /* the member's `"key":` (objects), as given */
    Py_ssize_t key_size, position; /* position: the element's index (lists) */
    Node *node;
} Member;
struct Node {
    int type; /* LEAF, OBJECT or LIST */
    const Column *column;
    Py_ssize_t count;
    Member *members;
};
enum { LEAF, OBJECT, LIST };

/* The tree as Python gives it: (LEAF, column) or (OBJECT, ((b'"key":', node), ...)) or (LIST,
 * ((position, node), ...)), positions rising. Its nodes come from `arena`; *per_row grows by what
 * a line may hold besides its leaves' text (keys, brackets, the nulls that fill a list's holes),
 * *text by the most its leaves' text may take in `length` rows. */
static Node *tree_node(PyObject *spec, const Column *columns, Py_ssize_t ncolumns, Py_ssize_t length, Node **arena,
                       Member **members, Py_ssize_t *per_row, Py_ssize_t *text) {
    Node *node = (*arena)++;
    PyObject *children;
    Py_ssize_t column;
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 2) goto bad;
    node->type = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
    if (node->type == LEAF) {
        column = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 1));
        if (column < 0 || column >= ncolumns) goto bad;
        node->column = &columns[column];
        *per_row += 32;
        *text += 6 * text_size(node->column, length); /* a string's bytes escaped: 6 at most each */
        return node;
    }
    children = PyTuple_GET_ITEM(spec, 1);
    if ((node->type != OBJECT && node->type != LIST) || !PyTuple_Check(children)) goto bad;
    node->count = PyTuple_GET_SIZE(children);
    node->members = *members;
    *members += node->count;
    *per_row += 2;
    for (Py_ssize_t k = 0; k < node->count; k++) {
        PyObject *child = PyTuple_GET_ITEM(children, k);
        Member *m = &node->members[k];
        if (!PyTuple_Check(child) || PyTuple_GET_SIZE(child) != 2) goto bad;
        if (node->type == OBJECT) {
            if (PyBytes_AsStringAndSize(PyTuple_GET_ITEM(child, 0), (char **)&m->key, &m->key_size) < 0) return NULL;
            *per_row += m->key_size + 1;
        } else {
            m->position = PyLong_AsSsize_t(PyTuple_GET_ITEM(child, 0));
            if (m->position < 0 || (k > 0 && m->position <= node->members[k - 1].position)) goto bad;
            *per_row += (m->position - (k > 0 ? node->members[k - 1].position : -1)) * 5;
        }
        if ((m->node = tree_node(PyTuple_GET_ITEM(child, 1), columns, ncolumns, length, arena, members, per_row,
                                 text)) == NULL)
            return NULL;
    }
    return node;
bad:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "malformed NDJSON tree");
    return NULL;
}

static Py_ssize_t tree_size(PyObject *spec) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(spec, 1))) return 1;
    Py_ssize_t size = 1;
    PyObject *children = PyTuple_GET_ITEM(spec, 1);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(children); k++) {
        PyObject *child = PyTuple_GET_ITEM(children, k);
        if (PyTuple_Check(child) && PyTuple_GET_SIZE(child) == 2) size += 1 + tree_size(PyTuple_GET_ITEM(child, 1));
    }
    return size;
}

/* A string as a JSON string literal: quote, backslash and control characters escaped (the short
 * forms, else \u00XX), everything else as it is. */
static char *put_escaped(char *w, const char *s, Py_ssize_t n) {
    static const char hex[] = "0123456789abcdef";
    *w++ = '"';
    for (const char *end = s + n; s < end; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c != '"' && c != '\\') { *w++ = (char)c; continue; }
        *w++ = '\\';
        switch (c) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '\b': *w++ = 'b'; break;
        case '\t': *w++ = 't'; break;
        case '\n': *w++ = 'n'; break;
        case '\f': *w++ = 'f'; break;
        case '\r': *w++ = 'r'; break;
        default: *w++ = 'u', *w++ = '0', *w++ = '0', *w++ = hex[c >> 4], *w++ = hex[c & 15];
        }
    }
    *w++ = '"';
    return w;
}

/* A node's JSON for row i at w; returns the end, or NULL when nothing below it has a value (then
 * nothing was written). */
static char *put_node(char *w, const Node *node, Py_ssize_t i) {
    if (node->type == LEAF) {
        const Column *c = node->column;
        if (!present(c, i)) return NULL;
        switch (c->kind) {
        case STRING: return put_escaped(w, c->data + offset_at(c, i), offset_at(c, i + 1) - offset_at(c, i));
        case JSON: {
            const char *s = c->data + offset_at(c, i);
            Py_ssize_t n = offset_at(c, i + 1) - offset_at(c, i);
            if (n == 4 && memcmp(s, "null", 4) == 0) return NULL;
            memcpy(w, s, n);
            return w + n;
        }
        case DATETIME: *w++ = '"', w = put_datetime(w, ((const int64_t *)c->values)[c->offset + i]), *w++ = '"'; return w;
        case BOOL: case INT: return put_cell(w, c, i, NULL);
        }
        return NULL;
    }
    char *last = NULL; /* the end of the last member or element written */
    *w++ = node->type == OBJECT ? '{' : '[';
    Py_ssize_t next = 0; /* LIST: the next position to write */
    for (Py_ssize_t k = 0; k < node->count; k++) {
        const Member *m = &node->members[k];
        char *at = w;
        if (node->type == OBJECT) {
            if (last != NULL) *w++ = ',';
            memcpy(w, m->key, m->key_size);
            w += m->key_size;
        } else {
            for (; next < m->position; next++) memcpy(w, next ? ",null" : "null", next ? 5 : 4), w += next ? 5 : 4;
            if (next++) *w++ = ',';
        }
        char *end = put_node(w, m->node, i);
        if (end != NULL) last = w = end;
        else if (node->type == OBJECT) w = at;
        else memcpy(w, "null", 4), w += 4;
    }
    if (last == NULL) return NULL;
    w = last; /* a list drops its trailing missing elements */
    *w++ = node->type == OBJECT ? '}' : ']';
    return w;
}

static PyObject *json_lines(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *specs, *tree, *result = NULL;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "O!On", &PyTuple_Type, &specs, &tree, &length)) return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(specs), nodes = tree_size(tree), per_row = 16, text = 0;
    Column *columns = get_columns(specs, length);
    if (columns == NULL) return NULL;
    Node *arena = PyMem_Calloc(nodes, sizeof(Node)), *next_node = arena;
    Member *members = PyMem_Calloc(nodes, sizeof(Member)), *next_member = members;
    PyObject *out = NULL;
    if (arena == NULL || members == NULL) { PyErr_NoMemory(); goto done; }
    Node *root = tree_node(tree, columns, count, length, &next_node, &next_member, &per_row, &text);
    if (root == NULL) goto done;
    if (root->type != OBJECT) { PyErr_SetString(PyExc_ValueError, "malformed NDJSON tree"); goto done; }
    Py_ssize_t bound = per_row * length + text;
    out = PyBytes_FromStringAndSize(NULL, bound);
    if (out == NULL) goto done;
    char *start = PyBytes_AS_STRING(out), *w = start;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < length; i++) {
        char *end = put_node(w, root, i);
        w = end != NULL ? end : (memcpy(w, "{}", 2), w + 2);
        *w++ = '\n';
    }
    Py_END_ALLOW_THREADS
    if (_PyBytes_Resize(&out, w - start) == 0) result = out;
    out = NULL;
done:
    Py_XDECREF(out);
    PyMem_Free(arena);
    PyMem_Free(members);
    release(columns, count);
    return result;
}

static PyMethodDef methods[] = {
    {"csv_lines", csv_lines, METH_VARARGS, "A batch's CSV lines (see the top of _cells.c)."},
    {"json_lines", json_lines, METH_VARARGS, "A batch's NDJSON lines (see the top of _cells.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cells", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cells(void) { return PyModule_Create(&module); }
