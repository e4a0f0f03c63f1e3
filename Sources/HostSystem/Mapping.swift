import Glibc

/// A memory mapping, owned: unmapped exactly once, when its owner goes.
public struct Mapping: ~Copyable, @unchecked Sendable {   // the pointer is the mapping's; sharing its memory is the owner's business
    package let base: UnsafeMutableRawPointer
    package let size: Int

    /// Maps `size` bytes of anonymous memory (mmap's `flags`); `what` names it in an error.
    package init(size: Int, protection: Int32 = PROT_READ | PROT_WRITE, flags: Int32, what: @autoclosure () -> String) throws(SystemCallError) {
        base = try Self.map(size, protection, flags, -1, 0, what)
        self.size = size
    }

    /// Maps `size` bytes of `fd` from `offset`.
    package init(size: Int, protection: Int32 = PROT_READ | PROT_WRITE, flags: Int32, fd: borrowing FileDescriptor, offset: off_t = 0,
                 what: @autoclosure () -> String) throws(SystemCallError) {
        base = try Self.map(size, protection, flags, fd.raw, offset, what)
        self.size = size
    }

    private static func map(_ size: Int, _ protection: Int32, _ flags: Int32, _ fd: Int32, _ offset: off_t,
                            _ what: () -> String) throws(SystemCallError) -> UnsafeMutableRawPointer {
        guard let p = mmap(nil, size, protection, flags, fd, offset), p != MAP_FAILED else {
            throw SystemCallError("mmap(\(what()))", errno: errno)
        }
        return p
    }

    /// Maps `size` bytes of anonymous memory (mmap's `flags`) starting at a multiple of `alignment`
    /// (a power of two): over-maps by `alignment`, gives the ends back, owns the middle.
    package init(size: Int, alignment: Int, flags: Int32, what: @autoclosure () -> String) throws(SystemCallError) {
        precondition(alignment >= 4096 && alignment & (alignment - 1) == 0 && size % 4096 == 0 && flags & MAP_HUGETLB == 0,
                     "an aligned mapping: whole 4 KiB pages, a power-of-two alignment, no hugetlb")
        let (total, overflow) = size.addingReportingOverflow(alignment)
        guard !overflow else { throw SystemCallError("mmap(\(what()))", errno: ENOMEM) }
        let p = try Self.map(total, PROT_READ | PROT_WRITE, flags, -1, 0, what)
        let head = (alignment - Int(bitPattern: UInt(bitPattern: p)) & (alignment - 1)) & (alignment - 1)
        if head > 0 { munmap(p, head) }
        let tail = total - head - size
        if tail > 0 { munmap(p + head + size, tail) }
        base = p + head
        self.size = size
    }

    deinit { munmap(base, size) }
}
