import Foundation
import Glibc
import Testing
@testable import GuestMemory

/// userfaultfd over guest RAM: a thread touching an absent page sleeps until the page is placed.
private final class Seen: @unchecked Sendable {   // written by one thread before the semaphore, read after
    var values: [UInt64] = [0, 0]
    subscript(i: Int) -> UInt64 { get { values[i] } set { values[i] = newValue } }
}

@Suite struct MissingPagesTests {
    /// Every backing: a reader of a discarded page sees what a fault handler placed, a page present
    /// before registration stays, zero placement works, and release wakes sleepers with zeros.
    @Test(arguments: [Backing.pages4K, .thp, .memfd, .hugetlb2M])
    func aTouchedPageWaitsForItsPlacement(backing: Backing) throws {
        let ram: GuestRAM
        do {
            ram = try GuestRAM(layout: RAMLayout(size: 16 << 20), backing: backing)
        } catch {
            print("SKIPPED userfaultfd test for \(backing): \(error)")
            return
        }
        let m = ram.slots[0]
        try m.populate()
        m.pointer.storeBytes(of: 0x1111, as: UInt64.self)                     // page 0: stays
        m.pointer.storeBytes(of: 0x2222, toByteOffset: 4 << 20, as: UInt64.self)   // dropped below
        try m.discard(offset: 4 << 20, length: 12 << 20)
        let faults = try MissingPages(ram: ram)
        let granule = faults.granule >> 12
        #expect(granule == (backing == .hugetlb2M ? 512 : 1))

        // A reader of page 1024 (4 MiB) sleeps until the handler places it.
        let seen = Seen()
        let done = DispatchSemaphore(value: 0)
        Thread {
            seen[0] = m.pointer.load(fromByteOffset: 4 << 20, as: UInt64.self)
            seen[1] = m.pointer.load(fromByteOffset: (4 << 20) + Int(faults.granule), as: UInt64.self)
            done.signal()
        }.start()
        var pages: [UInt64] = []
        for _ in 0..<50 where pages.isEmpty { pages = try faults.waitForFaults(timeout: 0.1) }
        #expect(pages.first.map { $0 / granule * granule } == 1024)
        let data = UnsafeMutableRawPointer.allocate(byteCount: Int(faults.granule), alignment: 4096)
        defer { data.deallocate() }
        data.initializeMemory(as: UInt8.self, repeating: 0, count: Int(faults.granule))
        data.storeBytes(of: 0xABCD, as: UInt64.self)
        #expect(try faults.place(page: 1024, count: granule, from: data))
        #expect(try !faults.place(page: 1024, count: granule, from: data), "a second placement is refused, not applied")
        // The next granule: zeros.
        pages = []
        for _ in 0..<50 where pages.isEmpty { pages = try faults.waitForFaults(timeout: 0.1) }
        #expect(pages.first.map { $0 / granule * granule } == 1024 + granule)
        #expect(try faults.placeZeros(page: 1024 + granule, count: granule))
        #expect(done.wait(timeout: .now() + 5) == .success)
        #expect(seen[0] == 0xABCD)
        #expect(seen[1] == 0)
        #expect(m.pointer.load(as: UInt64.self) == 0x1111, "a page present before registration does not fault")

        // A sleeper on a page nobody places wakes, reading zeros, on release.
        Thread {
            seen[0] = m.pointer.load(fromByteOffset: 12 << 20, as: UInt64.self)
            done.signal()
        }.start()
        pages = []
        for _ in 0..<50 where pages.isEmpty { pages = try faults.waitForFaults(timeout: 0.1) }
        #expect(!pages.isEmpty)
        faults.release()
        #expect(done.wait(timeout: .now() + 5) == .success)
        #expect(seen[0] == 0)
    }
}
