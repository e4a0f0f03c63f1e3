// userfaultfd(2): its ioctl numbers are macros and its structs unions Swift reads poorly, so the
// few operations post-copy needs are wrapped here. Each returns 0 or an errno value (positive).
#ifndef CVMM_UFFD_H
#define CVMM_UFFD_H

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

// A userfaultfd handling faults from kernel mode too (KVM reaches guest memory through
// get_user_pages), with the missing-page features for hugetlbfs and shmem. *fd_out gets the fd.
static inline int cvmm_uffd_open(int *fd_out) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        // Kernels that confine the system call still hand one out through /dev/userfaultfd.
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0) return errno;
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        int e = errno;
        close(dev);
        if (fd < 0) return e;
    }
    struct uffdio_api api = { .api = UFFD_API,
                              .features = UFFD_FEATURE_MISSING_HUGETLBFS | UFFD_FEATURE_MISSING_SHMEM };
    if (ioctl(fd, UFFDIO_API, &api) != 0) { int e = errno; close(fd); return e; }
    *fd_out = fd;
    return 0;
}

// Registers [start, start+len) for missing-page faults.
static inline int cvmm_uffd_register(int fd, uint64_t start, uint64_t len) {
    struct uffdio_register r = { .range = { .start = start, .len = len }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    return ioctl(fd, UFFDIO_REGISTER, &r) == 0 ? 0 : errno;
}

static inline int cvmm_uffd_unregister(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = { .start = start, .len = len };
    return ioctl(fd, UFFDIO_UNREGISTER, &r) == 0 ? 0 : errno;
}

// Places len bytes from src at dst (both page aligned) and wakes the threads faulting there.
// EEXIST: something was placed there first.
static inline int cvmm_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len) {
    struct uffdio_copy c = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = 0 };
    while (ioctl(fd, UFFDIO_COPY, &c) != 0) {
        if (errno != EAGAIN || c.copy < 0) return errno;
        // Partly done (the mm changed under it): go on from where it stopped.
        c.dst += (uint64_t)c.copy; c.src += (uint64_t)c.copy; c.len -= (uint64_t)c.copy; c.copy = 0;
    }
    return 0;
}

// Maps zeros at [start, start+len) and wakes the threads faulting there.
static inline int cvmm_uffd_zeropage(int fd, uint64_t start, uint64_t len) {
    struct uffdio_zeropage z = { .range = { .start = start, .len = len }, .mode = 0 };
    while (ioctl(fd, UFFDIO_ZEROPAGE, &z) != 0) {
        if (errno != EAGAIN || z.zeropage < 0) return errno;
        z.range.start += (uint64_t)z.zeropage; z.range.len -= (uint64_t)z.zeropage; z.zeropage = 0;
    }
    return 0;
}

static inline int cvmm_uffd_wake(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = { .start = start, .len = len };
    return ioctl(fd, UFFDIO_WAKE, &r) == 0 ? 0 : errno;
}

// Reads pending fault messages: the faulting addresses go to addrs (at most max); other events are
// skipped. Returns how many, 0 when none is pending, or -errno.
static inline int cvmm_uffd_read_faults(int fd, uint64_t *addrs, int max) {
    struct uffd_msg msgs[64];
    if (max > 64) max = 64;
    ssize_t n = read(fd, msgs, sizeof(struct uffd_msg) * (size_t)max);
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    int count = 0;
    for (ssize_t i = 0; i < n / (ssize_t)sizeof(struct uffd_msg); i++) {
        if (msgs[i].event == UFFD_EVENT_PAGEFAULT) addrs[count++] = msgs[i].arg.pagefault.address;
    }
    return count;
}

#endif
