// System calls glibc does not export to Swift. Every symbol is prefixed cvmm_.
#ifndef CVMM_SYS_H
#define CVMM_SYS_H

#include <sys/syscall.h>
#include <unistd.h>
#include <malloc.h>
#include <linux/memfd.h>
#include <sys/ioctl.h>

// memfd_create(2): glibc declares it only under _GNU_SOURCE, which Swift's Glibc module does not set.
static inline int cvmm_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}

// setns(2) into a network namespace (also _GNU_SOURCE only): this thread alone moves.
static inline int cvmm_setns_net(int fd) {
    return (int)syscall(SYS_setns, fd, 0x40000000 /* CLONE_NEWNET */);
}

// Bytes written to a socket that its peer has not acknowledged yet (SIOCOUTQ; ioctl is variadic,
// which Swift cannot call). -1 where the descriptor has no such queue (a file).
static inline int cvmm_unsent_bytes(int fd) {
    int n = 0;
    return ioctl(fd, TIOCOUTQ, &n) == 0 ? n : -1;
}

/// Keeps glibc from mapping large buffers fresh and trimming the heap after them (malloc.h is not
/// in Swift's Glibc module).
static inline void cvmm_keep_heap(int mmap_threshold, int trim_threshold) {
    mallopt(M_MMAP_THRESHOLD, mmap_threshold);
    mallopt(M_TRIM_THRESHOLD, trim_threshold);
}

#endif
