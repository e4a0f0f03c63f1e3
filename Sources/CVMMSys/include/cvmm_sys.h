// System calls glibc does not export to Swift. Every symbol is prefixed cvmm_.
#ifndef CVMM_SYS_H
#define CVMM_SYS_H

#include <sys/syscall.h>
#include <unistd.h>
#include <malloc.h>
#include <linux/memfd.h>

// memfd_create(2): glibc declares it only under _GNU_SOURCE, which Swift's Glibc module does not set.
static inline int cvmm_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}

/// Keeps glibc from mapping large buffers fresh and trimming the heap after them (malloc.h is not
/// in Swift's Glibc module).
static inline void cvmm_keep_heap(int mmap_threshold, int trim_threshold) {
    mallopt(M_MMAP_THRESHOLD, mmap_threshold);
    mallopt(M_TRIM_THRESHOLD, trim_threshold);
}

#endif
