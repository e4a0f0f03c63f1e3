// System calls glibc does not export to Swift. Every symbol is prefixed cvmm_.
#ifndef CVMM_SYS_H
#define CVMM_SYS_H

#include <sys/syscall.h>
#include <unistd.h>
#include <malloc.h>
#include <linux/memfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/socket.h>
#include <errno.h>

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

// Applies madvise `advice` to `count` ranges of this process at once: process_madvise(2) on our
// own pidfd takes up to 1024 ranges a call (and the kernel batches their TLB flushes), where a
// madvise per range would pay a system call and a flush each. Falls back to madvise per range where
// the kernel refuses. Returns 0 or the errno of the range that failed.
static inline int cvmm_madvise_ranges(const struct iovec *ranges, size_t count, int advice) {
    // Opened per call: a descriptor kept across a fork would name the parent.
    int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    size_t done = 0;
    while (pidfd >= 0 && done < count) {
        size_t n = count - done < 1024 ? count - done : 1024;
        ssize_t bytes = syscall(SYS_process_madvise, pidfd, ranges + done, n, advice, 0);
        if (bytes < 0) break;
        // A short count stops at a range it could not advise: that one goes through madvise below.
        size_t whole = 0, sum = 0;
        while (whole < n && sum + ranges[done + whole].iov_len <= (size_t)bytes) { sum += ranges[done + whole].iov_len; whole++; }
        done += whole;
        if (whole < n) break;
    }
    if (pidfd >= 0) close(pidfd);
    for (; done < count; done++) {
        if (madvise(ranges[done].iov_base, ranges[done].iov_len, advice) != 0) return errno;
    }
    return 0;
}

// A TUN device (IP packets, no packet information header) named `name`, made in this thread's
// network namespace; returns its descriptor (non-blocking) or -errno. TUNSETIFF is an ioctl Swift
// cannot call.
#include <fcntl.h>
#include <string.h>
#include <net/if.h>
// linux/if_tun.h's values (its header pulls in linux/if.h, which clashes with glibc's net/if.h).
#define CVMM_TUNSETIFF _IOW('T', 202, int)
#define CVMM_IFF_TUN 0x0001
#define CVMM_IFF_NO_PI 0x1000
/// accept4 with SOCK_CLOEXEC: the accepted socket is never inherited across an exec, even by a
/// process forked between accept and fcntl (glibc declares accept4 only under _GNU_SOURCE).
static inline int cvmm_accept_cloexec(int fd) {
    return (int)syscall(SYS_accept4, fd, (void *)0, (void *)0, SOCK_CLOEXEC);
}

/// An eventfd (close-on-exec, non-blocking) whose write wakes a poll on it.
static inline int cvmm_eventfd(void) {
    return (int)syscall(SYS_eventfd2, 0, O_CLOEXEC | O_NONBLOCK);
}

static inline int cvmm_tun_open(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = CVMM_IFF_TUN | CVMM_IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, CVMM_TUNSETIFF, &ifr) != 0) { int e = errno; close(fd); return -e; }
    return fd;
}

#endif
