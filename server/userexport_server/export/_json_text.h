/* What both C modules read of JSON text (_jsonpath.c, _cells.c). */
#ifndef USEREXPORT_JSON_TEXT_H
#define USEREXPORT_JSON_TEXT_H

/* The value of the four hex digits of a \uXXXX escape at p (before end), or -1. */
static int hex4(const char *p, const char *end) {
    int value = 0;
    if (end - p < 4) return -1;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                  : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (digit < 0) return -1;
        value = value * 16 + digit;
    }
    return value;
}

#endif
