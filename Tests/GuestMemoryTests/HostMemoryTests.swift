import Foundation
import Glibc
import Testing
@testable import GuestMemory

@Suite struct HostMemoryTests {
    @Test func pages4KAreNotHuge() throws {
        let m = try HostMemory(size: 8 << 20, backing: .pages4K)
        try m.populate()
        let r = m.report()
        #expect(r.rss >= 8 << 20)
        #expect(r.hugeTransparent == 0)
        #expect(!r.thpEligible)
    }

    @Test func thpIsAlignedAndEligible() throws {
        let m = try HostMemory(size: 16 << 20, backing: .thp)
        #expect(m.base.isAligned(to: PageSize.bytes2M))
        try m.populate()
        let r = m.report()
        #expect(r.thpEligible, "a MADV_HUGEPAGE mapping must be THP-eligible: \(r)")
        // The kernel may decline huge pages under fragmentation; report what it did.
        print("thp report: \(r)")
    }

    @Test func extraAlignment() throws {
        let m = try HostMemory(size: 4 << 20, backing: .pages4K, alignment: 1 << 30)
        #expect(m.base.isAligned(to: 1 << 30))
    }

    @Test func hugetlbWithoutReservationNamesTheSysctl() throws {
        let free = hugePagesFree()
        let result = Result { () throws(GuestMemoryError) -> HostMemory in try HostMemory(size: 4 << 20, backing: .hugetlb2M) }
        switch result {
        case let .success(m):
            #expect(free >= 2, "hugetlb mapping succeeded with \(free) free huge pages")
            m.pointer.storeBytes(of: 7, as: UInt8.self)
            #expect(m.report().hugetlb >= 2 << 20)
        case let .failure(e):
            #expect(e == .hugePagesNotReserved(pageSize: 2 << 20, requested: 4 << 20, sysctl: "/proc/sys/vm/nr_hugepages"))
            #expect(e.description.contains("/proc/sys/vm/nr_hugepages"))
            #expect(free < 2)
        }
        #expect(throws: GuestMemoryError.hugePageSizeMismatch(size: 3 << 20, pageSize: 2 << 20)) {
            _ = try HostMemory(size: 3 << 20, backing: .hugetlb2M)
        }
    }

    @Test func memfdIsSharedWithASecondMapping() throws {
        let m = try HostMemory(size: 1 << 20, backing: .memfd)
        let fd = try #require(m.memfd)
        m.pointer.storeBytes(of: 0xDEAD_BEEF, toByteOffset: 8192, as: UInt64.self)
        let other = mmap(nil, 1 << 20, PROT_READ, MAP_SHARED, fd, 0)!
        defer { munmap(other, 1 << 20) }
        #expect(other.load(fromByteOffset: 8192, as: UInt64.self) == 0xDEAD_BEEF)
        // Discard punches the hole in the file too.
        try m.discard(offset: 8192, length: 4096)
        #expect(other.load(fromByteOffset: 8192, as: UInt64.self) == 0)
    }

    @Test func discardZeroes() throws {
        let m = try HostMemory(size: 1 << 20, backing: .pages4K)
        m.pointer.storeBytes(of: 42, toByteOffset: 4096, as: UInt64.self)
        m.pointer.storeBytes(of: 43, toByteOffset: 0, as: UInt64.self)
        try m.discard(offset: 4096, length: 4096)
        #expect(m.pointer.load(fromByteOffset: 4096, as: UInt64.self) == 0)
        #expect(m.pointer.load(fromByteOffset: 0, as: UInt64.self) == 43)
    }

    @Test func badSizes() {
        #expect(throws: GuestMemoryError.zeroSize) { _ = try HostMemory(size: 0, backing: .pages4K) }
        #expect(throws: GuestMemoryError.unalignedSize(100, alignment: 4096)) { _ = try HostMemory(size: 100, backing: .thp) }
    }

    func hugePagesFree() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return 0 }
        for line in s.split(separator: "\n") where line.hasPrefix("HugePages_Free:") {
            return Int(line.split(separator: " ").last ?? "0") ?? 0
        }
        return 0
    }
}
