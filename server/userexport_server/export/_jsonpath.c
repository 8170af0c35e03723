/* The value at a path in each JSON text of an Arrow string array, as PostgreSQL's `json #> text[]`
 * gives it: the stored text of the value, unchanged (numbers as written, objects with their own
 * spacing and key order), from its first character to its last. See json_path.py for why and how.
 *
 * PostgreSQL's rules, followed here: a segment names an object's key (escapes in stored keys are
 * decoded before comparing), or an array's element when it reads as an int ("-1" counts from the
 * end); a key that occurs twice is followed each time and the last value found wins; anything else
 * (a scalar, a missing key or element, text that is not JSON) gives null. The empty path gives the
 * whole text, without the spaces around it, but for a scalar's leading ones, which PostgreSQL keeps. A key holding \u0000 or a
 * lone surrogate, which PostgreSQL refuses to decode, is a key no segment equals.
 *
 * One call per Arrow array: the scan runs without the GIL and allocates two output buffers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "_json_text.h"

typedef struct {
    const char *text;
    Py_ssize_t size;
} Segment;

typedef struct {
    const Segment *segments;
    int count;
    const char *start; /* the last value found, or NULL */
    const char *end;
} Search;

static const char *skip_space(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* p at an opening quote: the character after the closing one, or NULL. */
static const char *skip_string(const char *p, const char *end) {
    for (p++; p < end; p++) {
        if (*p == '"') return p + 1;
        if (*p == '\\') p++;
    }
    return NULL;
}

/* p at a value: the character after it, or NULL. Brackets are counted, strings skipped. */
static const char *skip_value(const char *p, const char *end) {
    Py_ssize_t depth = 0;
    while (p < end) {
        char c = *p;
        if (c == '"') {
            if ((p = skip_string(p, end)) == NULL) return NULL;
            if (depth == 0) return p;
            continue;
        }
        if (c == '{' || c == '[') {
            depth++;
        } else if (depth == 0 && (c == ',' || c == '}' || c == ']' || c == ':' || c == ' ' || c == '\t' ||
                                  c == '\n' || c == '\r')) {
            return p; /* the end of a scalar */
        } else if ((c == '}' || c == ']') && --depth == 0) {
            return p + 1;
        }
        p++;
    }
    return depth == 0 ? p : NULL;
}

/* p at a key's opening quote: whether its decoded text equals `segment` (ASCII, as paths.py allows);
 * *after is set past the closing quote (NULL: not a string). */
static int key_equals(const char *p, const char *end, const Segment *segment, const char **after) {
    Py_ssize_t matched = 0;
    int equal = 1;
    *after = NULL;
    for (p++; p < end; p++) {
        int c = (unsigned char)*p;
        if (c == '"') {
            *after = p + 1;
            return equal && matched == segment->size;
        }
        if (c == '\\') {
            if (++p >= end) return 0;
            switch (*p) {
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case 'u':
                c = hex4(p + 1, end);
                if (c < 0) return 0;
                p += 4;
                if (c == 0 || c >= 0x80) equal = 0; /* no segment holds it (see the top) */
                break;
            default: c = (unsigned char)*p; /* " \ / */
            }
        }
        if (equal && (matched >= segment->size || (unsigned char)segment->text[matched] != c)) equal = 0;
        matched++;
    }
    return 0;
}

/* A segment as an array index, by PostgreSQL's strtoint: the whole text an int, or INT_MIN. */
static long long segment_index(const Segment *segment) {
    const char *p = segment->text, *end = p + segment->size;
    int negative = 0;
    long long value = 0;
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\f' || *p == '\v')) p++;
    if (p < end && (*p == '-' || *p == '+')) negative = *p++ == '-';
    if (p == end) return INT_MIN;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9') return INT_MIN;
        value = value * 10 + (*p - '0');
        if (value > (long long)INT_MAX + 1) return INT_MIN;
    }
    value = negative ? -value : value;
    return value > INT_MAX || value < INT_MIN ? INT_MIN : value;
}

/* p just after a member's or element's value (NULL: the text was not JSON): past `close` with
 * *closed set when the container ends there, else at the next item after the comma; NULL when
 * neither follows. */
static const char *next_item(const char *p, const char *end, char close, int *closed) {
    *closed = 0;
    if (p == NULL) return NULL;
    p = skip_space(p, end);
    if (p < end && *p == close) return *closed = 1, p + 1;
    if (p >= end || *p != ',') return NULL;
    return skip_space(p + 1, end);
}

/* p at a value that segment `level` applies to: records every value at the path's end below it in
 * `search` (the last wins); returns the character after the value, or NULL when the text is not JSON. */
static const char *find(const char *p, const char *end, Search *search, int level) {
    if (level == search->count) {
        const char *after = skip_value(p, end);
        if (after != NULL) search->start = p, search->end = after;
        return after;
    }
    const Segment *segment = &search->segments[level];
    int closed;
    if (p < end && *p == '{') {
        p = skip_space(p + 1, end);
        if (p < end && *p == '}') return p + 1;
        while (p < end && *p == '"') {
            const char *after;
            int match = key_equals(p, end, segment, &after);
            if (after == NULL) return NULL;
            p = skip_space(after, end);
            if (p >= end || *p != ':') return NULL;
            p = skip_space(p + 1, end);
            p = match ? find(p, end, search, level + 1) : skip_value(p, end);
            if ((p = next_item(p, end, '}', &closed)) == NULL || closed) return p;
        }
        return NULL;
    }
    if (p < end && *p == '[') {
        long long wanted = segment_index(segment);
        const char *first = skip_space(p + 1, end);
        if (wanted < 0 && wanted != INT_MIN) { /* from the end: count the elements first */
            long long count = 0;
            for (p = first; p < end && *p != ']'; count++) {
                if ((p = skip_value(p, end)) == NULL) return NULL;
                p = skip_space(p, end);
                if (p < end && *p == ',') p = skip_space(p + 1, end);
            }
            wanted += count;
            if (wanted < 0) wanted = INT_MIN;
        }
        p = first;
        if (p < end && *p == ']') return p + 1;
        for (long long i = 0; p < end; i++) {
            p = i == wanted ? find(p, end, search, level + 1) : skip_value(p, end);
            if ((p = next_item(p, end, ']', &closed)) == NULL || closed) return p;
        }
        return NULL;
    }
    return skip_value(p, end);
}

static int bit(const uint8_t *bits, Py_ssize_t i) { return bits == NULL || (bits[i >> 3] >> (i & 7)) & 1; }

/* values_at(data, offsets, validity, offset, length, wide, segments) -> (offsets, data, validity, nulls):
 * the buffers of a large_string array of the values at the path (`wide`: int64 input offsets). */
static PyObject *values_at(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer data, offsets, validity = {0};
    PyObject *validity_object, *path;
    Py_ssize_t offset, length;
    int wide;
    if (!PyArg_ParseTuple(args, "y*y*OnnpO!", &data, &offsets, &validity_object, &offset, &length, &wide,
                          &PyTuple_Type, &path))
        return NULL;
    PyObject *result = NULL, *out_offsets = NULL, *out_data = NULL, *out_validity = NULL;
    Segment *segments = NULL;
    int count = (int)PyTuple_GET_SIZE(path);
    if (validity_object != Py_None && PyObject_GetBuffer(validity_object, &validity, PyBUF_SIMPLE) < 0) goto done;
    if (offsets.len < (offset + length + 1) * (wide ? 8 : 4)) {
        PyErr_SetString(PyExc_ValueError, "offsets buffer shorter than the array");
        goto done;
    }
    segments = PyMem_Calloc(count ? count : 1, sizeof(Segment));
    if (segments == NULL) { PyErr_NoMemory(); goto done; }
    for (int i = 0; i < count; i++) {
        segments[i].text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(path, i), &segments[i].size);
        if (segments[i].text == NULL) goto done;
    }
    out_offsets = PyBytes_FromStringAndSize(NULL, (length + 1) * 8);
    out_validity = PyBytes_FromStringAndSize(NULL, (length + 7) / 8);
    if (out_offsets == NULL || out_validity == NULL) goto done;
    const int32_t *narrow_in = offsets.buf;
    const int64_t *wide_in = offsets.buf;
    int64_t first = wide ? wide_in[offset] : narrow_in[offset], last = wide ? wide_in[offset + length]
                                                                             : narrow_in[offset + length];
    if (first < 0 || last < first || last > data.len) {
        PyErr_SetString(PyExc_ValueError, "offsets outside the data buffer");
        goto done;
    }
    out_data = PyBytes_FromStringAndSize(NULL, last - first);
    if (out_data == NULL) goto done;
    int64_t *out = (int64_t *)PyBytes_AS_STRING(out_offsets);
    uint8_t *valid_out = (uint8_t *)PyBytes_AS_STRING(out_validity);
    char *write = PyBytes_AS_STRING(out_data), *written = write;
    const char *text = data.buf;
    const uint8_t *valid_in = validity_object == Py_None ? NULL : validity.buf;
    Py_ssize_t nulls = 0;
    memset(valid_out, 0, (length + 7) / 8);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < length; i++) {
        Py_ssize_t at = offset + i;
        out[i] = write - written;
        if (!bit(valid_in, at)) { nulls++; continue; }
        int64_t from = wide ? wide_in[at] : narrow_in[at], to = wide ? wide_in[at + 1] : narrow_in[at + 1];
        const char *end = text + to;
        Search search = {segments, count, NULL, NULL};
        const char *start = skip_space(text + from, end);
        if (start < end && find(start, end, &search, 0) != NULL && search.start != NULL) {
            if (count == 0 && *start != '{' && *start != '[') search.start = text + from; /* as PostgreSQL */
            memcpy(write, search.start, search.end - search.start);
            write += search.end - search.start;
            valid_out[i >> 3] |= (uint8_t)(1 << (i & 7));
        } else {
            nulls++;
        }
    }
    out[length] = write - written;
    Py_END_ALLOW_THREADS
    if (_PyBytes_Resize(&out_data, write - written) < 0) goto done;
    result = Py_BuildValue("(OOOn)", out_offsets, out_data, out_validity, nulls);
done:
    Py_XDECREF(out_offsets);
    Py_XDECREF(out_data);
    Py_XDECREF(out_validity);
    PyMem_Free(segments);
    PyBuffer_Release(&data);
    PyBuffer_Release(&offsets);
    if (validity.obj != NULL) PyBuffer_Release(&validity);
    return result;
}

static PyMethodDef methods[] = {
    {"values_at", values_at, METH_VARARGS, "The buffers of the values at a path (see json_path.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonpath", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jsonpath(void) { return PyModule_Create(&module); }
