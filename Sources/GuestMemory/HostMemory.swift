import CVMMSys
import Foundation
import Glibc
import HostSystem

/// How a memslot's host memory is obtained.
public enum Backing: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Anonymous private memory in 4 KiB pages (MADV_NOHUGEPAGE).
    case pages4K = "4k"
    /// Anonymous private memory, 2 MiB aligned, MADV_HUGEPAGE: the kernel may back it with 2 MiB THPs.
    case thp
    /// hugetlbfs 2 MiB pages (MAP_HUGETLB); needs pages reserved in /proc/sys/vm/nr_hugepages.
    case hugetlb2M = "hugetlb"
    /// hugetlbfs 1 GiB pages (MAP_HUGETLB | MAP_HUGE_1GB).
    case hugetlb1G = "hugetlb1g"
    /// A shared memfd mapping, so another process or a snapshot can map the same memory.
    case memfd

    /// The largest page the host promises for this backing: the stage-2 never maps larger than this.
    public var hostPageSize: PageSize {
        switch self {
        case .pages4K, .memfd: return .size4K
        case .thp, .hugetlb2M: return .size2M
        case .hugetlb1G: return .size1G
        }
    }

    public var description: String { rawValue }
}

/// One contiguous host mapping backing guest memory. Unmapped (and its memfd closed) on deinit.
public final class HostMemory: @unchecked Sendable {   // immutable mapping; guest memory is shared by design
    public let base: HVA
    public let size: UInt64
    public let backing: Backing
    /// The memfd behind a `.memfd` mapping.
    private let file: FileDescriptor?
    /// Its number, for this package's own calls on it.
    package let memfd: Int32?
    private let mapping: Mapping

    public var range: HVARange { HVARange(start: base, size: size) }
    public var pointer: UnsafeMutableRawPointer { base.pointer }

    /// Maps `size` bytes with `backing`. `alignment` (a power of two) raises the start alignment beyond
    /// what the backing needs, e.g. 1 GiB so a 4k or thp range can be mapped by 1 GiB stage-2 blocks.
    public init(size: UInt64, backing: Backing, alignment: UInt64 = 0) throws(GuestMemoryError) {
        guard size > 0 else { throw .zeroSize }
        guard size % PageSize.bytes4K == 0 else { throw .unalignedSize(size, alignment: PageSize.bytes4K) }
        guard alignment & (alignment &- 1) == 0, alignment <= 1 << 40 else {
            throw .badLayout("a start alignment of \(alignment) bytes: give a power of two up to 1 TiB (or 0)")
        }
        self.size = size
        self.backing = backing
        switch backing {
        case .pages4K, .thp:
            // THP: start on a 2 MiB boundary, else the kernel cannot place PMD-sized pages and the
            // stage-2 cannot use 2 MiB blocks congruent with them.
            let align = max(alignment, backing == .thp ? PageSize.bytes2M : PageSize.bytes4K)
            let m = try Self.host { () throws(SystemCallError) in
                try Mapping(size: Int(size), alignment: Int(align), flags: MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, what: formatBytes(size))
            }
            let advice = backing == .thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE
            _ = try Self.host { () throws(SystemCallError) in
                try system(backing == .thp ? "madvise(MADV_HUGEPAGE)" : "madvise(MADV_NOHUGEPAGE)") { madvise(m.base, m.size, advice) }
            }
            mapping = m
            file = nil
            memfd = nil
        case .hugetlb2M, .hugetlb1G:
            let ps = backing.hostPageSize.bytes
            guard size % ps == 0 else { throw .hugePageSizeMismatch(size: size, pageSize: ps) }
            let sizeFlag: Int32 = (backing == .hugetlb1G ? 30 : 21) << MAP_HUGE_SHIFT
            do {
                mapping = try Mapping(size: Int(size), flags: MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | sizeFlag, what: formatBytes(size))
            } catch where error.errno == ENOMEM || error.errno == EINVAL {
                let sysctl = backing == .hugetlb1G
                    ? "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
                    : "/proc/sys/vm/nr_hugepages"
                throw .hugePagesNotReserved(pageSize: ps, requested: size, sysctl: sysctl)
            } catch {
                throw .systemCall(error.call, errno: error.errno)
            }
            file = nil
            memfd = nil
        case .memfd:
            // Owned as soon as made: a failure after closes and unmaps what was made before it.
            let fd = try Self.host { () throws(SystemCallError) in
                FileDescriptor(owning: try system("memfd_create") { cvmm_memfd_create("vmm-guest", UInt32(MFD_CLOEXEC)) })
            }
            _ = try Self.host { () throws(SystemCallError) in try system("ftruncate(memfd, \(size))") { ftruncate(fd.raw, off_t(size)) } }
            mapping = try Self.host { () throws(SystemCallError) in try Mapping(size: Int(size), flags: MAP_SHARED, fd: fd, what: formatBytes(size)) }
            memfd = fd.raw
            file = consume fd
        }
        base = HVA(mapping.base)
    }

    /// `body`'s system-call failure as this type's error.
    private static func host<T: ~Copyable>(_ body: () throws(SystemCallError) -> T) throws(GuestMemoryError) -> T {
        do { return try body() } catch { throw .systemCall(error.call, errno: error.errno) }
    }

    /// Drops the host pages of a range (the memory reads back as zeros). The caller must first have
    /// invalidated every stage-2 mapping of the range (see Stage2MMU.discard).
    public func discard(offset: UInt64, length: UInt64) throws(GuestMemoryError) {
        precondition(offset + length <= size, "discard beyond the mapping")
        // A shared memfd keeps its pages in the file: MADV_REMOVE punches the hole there too.
        let advice = backing == .memfd ? MADV_REMOVE : MADV_DONTNEED
        guard madvise(pointer + Int(offset), Int(length), advice) == 0 else {
            throw .systemCall(advice == MADV_REMOVE ? "madvise(MADV_REMOVE)" : "madvise(MADV_DONTNEED)", errno: errno)
        }
    }

    /// Drops the host pages of many ranges (offset, length) at once, as `discard` does one.
    public func discard(ranges: [(offset: UInt64, length: UInt64)]) throws(GuestMemoryError) {
        let advice = backing == .memfd ? MADV_REMOVE : MADV_DONTNEED
        let vector = ranges.map { r -> iovec in
            precondition(r.offset + r.length <= size, "discard beyond the mapping")
            return iovec(iov_base: pointer + Int(r.offset), iov_len: Int(r.length))
        }
        let e = vector.withUnsafeBufferPointer { cvmm_madvise_ranges($0.baseAddress, $0.count, advice) }
        guard e == 0 else { throw .systemCall(advice == MADV_REMOVE ? "madvise(MADV_REMOVE)" : "madvise(MADV_DONTNEED)", errno: e) }
    }

    /// Faults in every host page of a range for writing (MADV_POPULATE_WRITE), so later measurements
    /// do not include the host's own first-touch faults.
    public func populate(offset: UInt64 = 0, length: UInt64? = nil) throws(GuestMemoryError) {
        let len = length ?? (size - offset)
        guard madvise(pointer + Int(offset), Int(len), MADV_POPULATE_WRITE) == 0 else {
            throw .systemCall("madvise(MADV_POPULATE_WRITE)", errno: errno)
        }
    }
}
