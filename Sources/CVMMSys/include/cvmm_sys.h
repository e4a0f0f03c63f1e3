// System calls glibc does not export to Swift. Every symbol is prefixed cvmm_.
#ifndef CVMM_SYS_H
#define CVMM_SYS_H

#include <sys/syscall.h>
#include <unistd.h>
#include <linux/memfd.h>

// memfd_create(2): glibc declares it only under _GNU_SOURCE, which Swift's Glibc module does not set.
static inline int cvmm_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}

#endif
