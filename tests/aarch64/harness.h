/* The kernels linked into the aarch64 check: written by
 * compiler/examples/aarch64_kernels.rs into table.c. */
#ifndef EDGE_HARNESS_H
#define EDGE_HARNESS_H

struct kernel {
    const char *name;
    int kind; /* 0 matvec, 1 decode, 2 sparse matvec, 3 sparse decode */
    void *fn;
};

extern const struct kernel KERNELS[];
extern const int NKERNELS;

#endif
