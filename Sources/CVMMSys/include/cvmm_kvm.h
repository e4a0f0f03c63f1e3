// KVM's ioctl numbers are function-like macros Swift cannot import; they are re-exported here as
// constants, with the one ioctl helper Swift needs (ioctl(2) is variadic). Every symbol is cvmm_.
#ifndef CVMM_KVM_H
#define CVMM_KVM_H

#include <linux/kvm.h>
#include <sys/ioctl.h>

static inline int cvmm_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
static inline int cvmm_ioctl_value(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }

static const unsigned long cvmm_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long cvmm_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long cvmm_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long cvmm_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long cvmm_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long cvmm_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long cvmm_KVM_RUN = KVM_RUN;
static const unsigned long cvmm_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long cvmm_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long cvmm_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long cvmm_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long cvmm_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long cvmm_KVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG;
static const unsigned long cvmm_KVM_ENABLE_CAP = KVM_ENABLE_CAP;
static const unsigned long cvmm_KVM_RESET_DIRTY_RINGS = KVM_RESET_DIRTY_RINGS;
static const unsigned long cvmm_KVM_GET_FPU = KVM_GET_FPU;
static const unsigned long cvmm_KVM_SET_FPU = KVM_SET_FPU;

#endif
