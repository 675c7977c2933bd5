/* Runs each generated aarch64 kernel on the inputs its <name>.bin holds and compares the
 * outputs with the Rust reference's (see compiler/examples/aarch64_kernels.rs for the
 * file layout). Prints one line per kernel and "N passed, M failed"; exits non-zero on
 * any failure or unreadable file. Usage: harness DATA_DIR */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

typedef void (*matvec_fn)(const int8_t *, const float *, const float *, const uint8_t *,
                          const uint8_t *, const uint8_t *, float *, uint64_t, uint64_t);
typedef void (*decode_fn)(const uint8_t *, const uint8_t *, const uint8_t *, float *, uint64_t,
                          uint64_t);
typedef void (*sparse_matvec_fn)(const float *, const uint8_t *, const uint8_t *, const uint8_t *,
                                 const uint8_t *, const uint64_t *, const uint64_t *, float *,
                                 float *, uint64_t, uint64_t);
typedef void (*sparse_decode_fn)(const uint8_t *, const uint8_t *, const uint8_t *,
                                 const uint8_t *, const uint64_t *, const uint64_t *, float *,
                                 uint64_t, uint64_t);

/* Values a sparse decode kernel may write past its last row, and the scratch row's slack. */
#define SPARSE_SLACK 136

struct blob {
    uint64_t len;
    uint8_t *data;
};

static int read_u64(FILE *f, uint64_t *v) { return fread(v, 8, 1, f) == 1 ? 0 : -1; }

static int read_blob(FILE *f, struct blob *b) {
    if (read_u64(f, &b->len)) return -1;
    if (b->len > (1u << 28)) return -1;
    b->data = malloc(b->len + 16);
    if (!b->data) return -1;
    memset(b->data, 0, b->len + 16);
    return b->len == 0 || fread(b->data, 1, b->len, f) == b->len ? 0 : -1;
}

/* Returns the number of mismatches, or -1 when the data file is unreadable. */
static long run(const char *dir, const struct kernel *k) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.bin", dir, k->name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot open\n", path);
        return -1;
    }
    uint64_t kind, rows, cols, padded;
    struct blob codes, scales, mins, xq, xd, xs, expected, tol, pos, kstart, gstart;
    if (read_u64(f, &kind) || read_u64(f, &rows) || read_u64(f, &cols) || read_u64(f, &padded) ||
        read_blob(f, &codes) || read_blob(f, &scales) || read_blob(f, &mins) || read_blob(f, &xq) ||
        read_blob(f, &xd) || read_blob(f, &xs) || read_blob(f, &expected) || read_blob(f, &tol) ||
        read_blob(f, &pos) || read_blob(f, &kstart) || read_blob(f, &gstart) || kind > 3 ||
        expected.len < 4 * (kind % 2 ? rows * cols : rows) ||
        (kind >= 2 && kstart.len < 8 * (rows + 1))) {
        fprintf(stderr, "%s: truncated or corrupt\n", path);
        fclose(f);
        return -1;
    }
    fclose(f);
    const uint8_t *sp = scales.len ? scales.data : codes.data;
    const uint8_t *mp = mins.len ? mins.data : sp;
    const uint64_t *ks = (const uint64_t *)kstart.data, *gs = (const uint64_t *)gstart.data;
    const float *want = (const float *)expected.data, *eps = (const float *)tol.data;
    long bad = 0;
    if (kind == 0 || kind == 2) {
        float *y = malloc(rows * sizeof(float));
        float *scratch = calloc(cols + SPARSE_SLACK, sizeof(float));
        uint64_t h = rows / 2;
        /* Two calls: the second starts mid-weight (r0 > 0). */
        if (kind == 0) {
            matvec_fn fn = (matvec_fn)k->fn;
            fn((const int8_t *)xq.data, (const float *)xd.data, (const float *)xs.data,
               codes.data, sp, mp, y, 0, h);
            fn((const int8_t *)xq.data, (const float *)xd.data, (const float *)xs.data,
               codes.data, sp, mp, y + h, h, rows);
        } else {
            sparse_matvec_fn fn = (sparse_matvec_fn)k->fn;
            const float *x = (const float *)xq.data;
            fn(x, codes.data, sp, mp, pos.data, ks, gs, scratch, y, 0, h);
            fn(x, codes.data, sp, mp, pos.data, ks, gs, scratch, y + h, h, rows);
        }
        free(scratch);
        for (uint64_t r = 0; r < rows; r++)
            if (!(fabsf(y[r] - want[r]) <= eps[r])) {
                if (bad < 3) fprintf(stderr, "%s: y[%llu] = %g, want %g\n", k->name,
                                     (unsigned long long)r, y[r], want[r]);
                bad++;
            }
        free(y);
    } else {
        float *out = malloc((rows * padded + SPARSE_SLACK) * sizeof(float));
        uint64_t h = rows / 2;
        /* Two calls again; the first may write slack into the second's rows. */
        if (kind == 1) {
            ((decode_fn)k->fn)(codes.data, sp, mp, out, 0, h);
            ((decode_fn)k->fn)(codes.data, sp, mp, out + h * padded, h, rows);
        } else {
            ((sparse_decode_fn)k->fn)(codes.data, sp, mp, pos.data, ks, gs, out, 0, h);
            ((sparse_decode_fn)k->fn)(codes.data, sp, mp, pos.data, ks, gs, out + h * padded, h,
                                      rows);
        }
        for (uint64_t r = 0; r < rows; r++)
            for (uint64_t j = 0; j < cols; j++) {
                float got = out[r * padded + j], w = want[r * cols + j];
                if (!(fabsf(got - w) <= eps[r * cols + j])) {
                    if (bad < 3) fprintf(stderr, "%s: w[%llu, %llu] = %g, want %g\n", k->name,
                                         (unsigned long long)r, (unsigned long long)j, got, w);
                    bad++;
                }
            }
        free(out);
    }
    return bad;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DATA_DIR\n", argv[0]);
        return 2;
    }
    int passed = 0, failed = 0;
    for (int i = 0; i < NKERNELS; i++) {
        long bad = run(argv[1], &KERNELS[i]);
        printf("%-40s %s\n", KERNELS[i].name, bad == 0 ? "ok" : "FAILED");
        if (bad == 0)
            passed++;
        else
            failed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
