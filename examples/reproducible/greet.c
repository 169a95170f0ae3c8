#include <stdio.h>
#include "greet.h"

void greet(char *out, size_t len, const char *name) {
    snprintf(out, len, "hello, %s", name);
}
