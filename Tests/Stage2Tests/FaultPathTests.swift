import DirtyLog
import Foundation
import Synchronization
import Testing
@testable import GuestMemory
@testable import Stage2

@Suite struct FaultPathTests {
    @Test func alignedTHPSlotGetsBlocksAndMisalignedGets4K() throws {
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        let mem = try HostMemory(size: 8 << 20, backing: .thp)
        // Slot 0: GPA and HVA both 2 MiB aligned. Slot 1: the host side starts 4 KiB into a 2 MiB page.
        try mmu.addSlot(id: 0, gpa: GPA(0), size: 4 << 20, memory: mem)
        try mmu.addSlot(id: 1, gpa: GPA(1 << 30), size: 2 << 20, memory: mem, memoryOffset: (4 << 20) + 4096)
        #expect(mmu.handleFault(GPA(0x12_3456), .write, cache: &cache) == .mapped(.size2M))
        #expect(mmu.leaf(at: GPA(0x1F_F000))?.size == .size2M)
        #expect(mmu.translate(GPA(0x12_3456))?.hostPage(for: GPA(0x12_3456)) == mem.base + 0x12_3000)
        #expect(mmu.handleFault(GPA((1 << 30) + 0x5000), .write, cache: &cache) == .mapped(.size4K))
        #expect(mmu.translate(GPA((1 << 30) + 0x5000))?.hostPage(for: GPA((1 << 30) + 0x5000))
                == mem.base + (4 << 20) + 4096 + 0x5000)
        cache.drain()
    }

    /// hugetlb backings map blocks of their page size. Needs pages reserved in
    /// /proc/sys/vm/nr_hugepages (.ci/run reserves some); without them this says so loudly.
    @Test(arguments: [Backing.hugetlb2M, .hugetlb1G])
    func hugetlbSlotsGetBlocksOfTheirPageSize(backing: Backing) throws {
        let size = backing.hostPageSize.bytes * 2
        let memory: HostMemory
        do {
            memory = try HostMemory(size: size, backing: backing)
        } catch {
            print("SKIPPED hugetlb fault-path test for \(backing): \(error)")
            return
        }
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        try mmu.addSlot(id: 0, gpa: GPA(4 << 30), size: size, memory: memory)
        let gpa = GPA((4 << 30) + backing.hostPageSize.bytes + 0x5123)
        #expect(mmu.handleFault(gpa, .write, cache: &cache) == .mapped(backing.hostPageSize))
        #expect(mmu.translate(gpa)?.hostPage(for: gpa) == memory.base + backing.hostPageSize.bytes + 0x5000)
        #expect(memory.report().hugetlb > 0 || memory.report().kernelPageSize == backing.hostPageSize.bytes)
        cache.drain()
    }

    @Test func mappingSizeRespectsBackingSlotBoundsAndCongruence() {
        func slot(_ gpa: UInt64, _ size: UInt64, _ hva: UInt64, _ b: Backing, _ f: MemslotFlags = []) -> Memslot {
            Memslot(id: 0, gpaRange: GPARange(start: GPA(gpa), size: size), hvaStart: HVA(hva), backing: b, flags: f)
        }
        let g = UInt64(1 << 30)
        #expect(Stage2MMU.mappingSize(for: GPA(g + 5), in: slot(g, 2 * g, 4 * g, .hugetlb1G)) == .size1G)
        // 1G backing but the slot ends 2M into the second gigabyte: 2M there.
        #expect(Stage2MMU.mappingSize(for: GPA(2 * g + 5), in: slot(g, g + (2 << 20), 4 * g, .hugetlb1G)) == .size2M)
        // GPA and HVA congruent modulo 2M but not 1G: 2M.
        #expect(Stage2MMU.mappingSize(for: GPA(g), in: slot(g, g, 4 * g + (2 << 20), .hugetlb1G)) == .size2M)
        // Not congruent modulo 2M: force 4K.
        #expect(Stage2MMU.mappingSize(for: GPA(g), in: slot(g, g, 4 * g + 4096, .thp)) == .size4K)
        // The backing caps the size.
        #expect(Stage2MMU.mappingSize(for: GPA(g), in: slot(g, g, 4 * g, .pages4K)) == .size4K)
        #expect(Stage2MMU.mappingSize(for: GPA(g), in: slot(g, g, 4 * g, .thp)) == .size2M)
        // A slot smaller than a block, or a page in the slot's unaligned tail: 4K.
        #expect(Stage2MMU.mappingSize(for: GPA(g + (2 << 20)), in: slot(g, (3 << 20), 4 * g, .thp)) == .size4K)
        #expect(Stage2MMU.mappingSize(for: GPA(g), in: slot(g, (3 << 20), 4 * g, .thp)) == .size2M)
        // Dirty logging maps 4K.
        #expect(Stage2MMU.mappingSize(for: GPA(g), in: slot(g, g, 4 * g, .hugetlb1G), logging: .writeProtect) == .size4K)
        #expect(Stage2MMU.mappingSize(for: GPA(g), in: slot(g, g, 4 * g, .hugetlb1G), logging: .dbm) == .size4K)
        #expect(Stage2MMU.mappingSize(for: GPA(g), in: slot(g, g, 4 * g, .hugetlb1G), logging: .blockGranular) == .size1G)
    }

    @Test func outsideEverySlotIsAnMMIOExitAndMapsNothing() throws {
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        let mem = try HostMemory(size: 1 << 20, backing: .pages4K)
        try mmu.addSlot(id: 0, gpa: GPA(0), size: 1 << 20, memory: mem)
        #expect(mmu.handleFault(GPA(1 << 20), .read, cache: &cache) == .mmio(GPA(1 << 20), .read))
        #expect(mmu.handleFault(GPA(0xFEE0_0000), .write, cache: &cache) == .mmio(GPA(0xFEE0_0000), .write))
        #expect(mmu.census().leaves == [0, 0, 0, 0])
        cache.drain()
    }

    @Test func readOnlySlot() throws {
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        let mem = try HostMemory(size: 1 << 20, backing: .pages4K)
        try mmu.addSlot(id: 3, gpa: GPA(0), size: 1 << 20, memory: mem, flags: .readOnly)
        #expect(mmu.handleFault(GPA(0x2000), .write, cache: &cache) == .readOnlyWrite(GPA(0x2000), slot: 3))
        #expect(mmu.handleFault(GPA(0x2000), .read, cache: &cache) == .mapped(.size4K))
        #expect(mmu.translate(GPA(0x2000))?.leaf.permissions == [.read, .execute])
        // A write to the read-only leaf still exits.
        #expect(mmu.handleFault(GPA(0x2000), .write, cache: &cache) == .readOnlyWrite(GPA(0x2000), slot: 3))
        // Made writable, the permission fault relaxes the leaf in place.
        try mmu.setSlotFlags(id: 3, [])
        #expect(mmu.handleFault(GPA(0x2000), .write, cache: &cache) == .retry)
        #expect(mmu.translate(GPA(0x2000))?.leaf.permissions == .all)
        // And read-only again write-protects the existing leaf at once.
        try mmu.setSlotFlags(id: 3, .readOnly)
        #expect(mmu.translate(GPA(0x2000))?.leaf.permissions == [.read, .execute])
        cache.drain()
    }

    @Test func deleteAndMoveUnmap() throws {
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        let mem = try HostMemory(size: 4 << 20, backing: .thp)
        try mmu.addSlot(id: 0, gpa: GPA(0), size: 4 << 20, memory: mem)
        #expect(mmu.handleFault(GPA(0x1000), .read, cache: &cache) == .mapped(.size2M))
        try mmu.moveSlot(id: 0, to: GPA(1 << 30))
        #expect(mmu.translate(GPA(0x1000)) == nil)
        #expect(mmu.handleFault(GPA(0x1000), .read, cache: &cache) == .mmio(GPA(0x1000), .read))
        #expect(mmu.handleFault(GPA((1 << 30) + 0x1000), .read, cache: &cache) == .mapped(.size2M))
        #expect(mmu.translate(GPA((1 << 30) + 0x1000))?.hostPage(for: GPA((1 << 30) + 0x1000)) == mem.base + 0x1000)
        try mmu.deleteSlot(id: 0)
        #expect(mmu.translate(GPA((1 << 30) + 0x1000)) == nil)
        #expect(mmu.census().tableBytes == 4096, "only the root remains")
        #expect(throws: GuestMemoryError.noSuchSlot(0)) { try mmu.deleteSlot(id: 0) }
        cache.drain()
    }

    @Test func loggingFlagWriteProtectsSplitsOnWriteAndBlocksReturnAfter() throws {
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        let mem = try HostMemory(size: 4 << 20, backing: .thp)
        try mmu.addSlot(id: 0, gpa: GPA(0), size: 4 << 20, memory: mem)
        #expect(mmu.handleFault(GPA(0), .write, cache: &cache) == .mapped(.size2M))
        try mmu.setSlotFlags(id: 0, .dirtyLogging)
        let block = try #require(mmu.translate(GPA(0)))
        #expect(block.level == 2 && !block.leaf.has(Descriptor.write) && block.leaf.has(Descriptor.swLogged))
        // The first write splits the block, the second makes the one page writable and dirty.
        #expect(mmu.handleFault(GPA(0x3000), .write, cache: &cache) == .retry)
        #expect(mmu.translate(GPA(0x3000))?.level == 3)
        #expect(mmu.handleFault(GPA(0x3000), .write, cache: &cache) == .retry)
        #expect(mmu.translate(GPA(0x3000))?.leaf.has(Descriptor.write) == true)
        #expect(mmu.translate(GPA(0x4000))?.leaf.has(Descriptor.write) == false)
        var pages: [UInt64] = []
        forEachSetBit(try mmu.getDirtyLog(slot: 0)) { pages.append($0) }
        #expect(pages == [3])
        // New faults while logging map 4K.
        #expect(mmu.handleFault(GPA(0x20_0000), .read, cache: &cache) == .mapped(.size4K))
        // Logging off: the small leaves go, and later faults map blocks again.
        try mmu.setSlotFlags(id: 0, [])
        #expect(mmu.handleFault(GPA(0x1000), .write, cache: &cache) == .mapped(.size2M))
        #expect(mmu.handleFault(GPA(0x20_0000), .write, cache: &cache) == .mapped(.size2M))
        cache.drain()
    }

    @Test func faultRacingAnInvalidationRetriesAndInstallsNothingStale() throws {
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        let mem = try HostMemory(size: 4 << 20, backing: .pages4K)
        try mmu.addSlot(id: 0, gpa: GPA(0), size: 4 << 20, memory: mem)
        // An invalidation that begins and ends inside the fault's window (after it read the sequence).
        let range = HVARange(start: mem.base, size: 4 << 20)
        let fired = Atomic<Int>(0)
        mmu.faultWindowHook = { [unowned mmu] in
            if fired.add(1, ordering: .relaxed).newValue == 1 {
                mmu.invalidateRangeStart(range)
                mmu.invalidateRangeEnd(range)
            }
        }
        #expect(mmu.handleFault(GPA(0x3000), .write, cache: &cache) == .retry)
        #expect(mmu.translate(GPA(0x3000)) == nil, "a fault that raced an invalidation must not install")
        #expect(mmu.handleFault(GPA(0x3000), .write, cache: &cache) == .mapped(.size4K))
        mmu.faultWindowHook = nil

        // While an invalidation is in progress, faults on its range retry; elsewhere they proceed.
        let part = HVARange(start: mem.base, size: 1 << 20)
        mmu.invalidateRangeStart(part)
        #expect(mmu.translate(GPA(0x3000)) == nil, "invalidation start unmaps the range")
        #expect(mmu.handleFault(GPA(0x3000), .read, cache: &cache) == .retry)
        #expect(mmu.handleFault(GPA(0x20_0000), .read, cache: &cache) == .mapped(.size4K))
        mmu.invalidateRangeEnd(part)
        #expect(mmu.handleFault(GPA(0x3000), .read, cache: &cache) == .mapped(.size4K))
        #expect(mmu.invalidationSequence == 2)
        cache.drain()
    }

    /// The in-progress check covers every host page the new leaf would map, not just the faulting one.
    @Test func blockFaultNextToAnInvalidatedPageWaits() throws {
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        let mem = try HostMemory(size: 4 << 20, backing: .thp)
        try mmu.addSlot(id: 0, gpa: GPA(0), size: 4 << 20, memory: mem)
        let page = HVARange(start: mem.base + 0x1000, size: 4096)
        mmu.invalidateRangeStart(page)
        #expect(mmu.handleFault(GPA(0x10_0000), .write, cache: &cache) == .retry)
        #expect(mmu.translate(GPA(0x1000)) == nil, "a 2M block over a page under invalidation must wait")
        #expect(mmu.handleFault(GPA(0x30_0000), .write, cache: &cache) == .mapped(.size2M))
        mmu.invalidateRangeEnd(page)
        #expect(mmu.handleFault(GPA(0x10_0000), .write, cache: &cache) == .mapped(.size2M))
        cache.drain()
    }

    /// A fault that finds the page already mapped leaves the leaf alone: it must not undo a write
    /// protection that happened between its walk and its map.
    @Test func sharedMapDoesNotRewriteAnExistingLeaf() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 4096), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        _ = mmu.protect(GPARange(start: GPA(0), size: 4096), set: Descriptor.swLogged, clear: Descriptor.write)
        var v = MapVisitor(start: GPA(0), output: mem.base, size: .size4K,
                           attributes: Permissions.all.rawValue | Descriptor.accessFlag, changes: mmu.changeHook, cache: cache)
        mmu.lock.shared { _ = mmu.walk(GPARange(start: GPA(0), size: 4096), shared: true, &v) }
        cache = v.cache
        let d = try #require(mmu.translate(GPA(0))).leaf
        #expect(!d.has(Descriptor.write) && d.has(Descriptor.swLogged))
        cache.drain()
    }

    @Test func explicitMapRemovingAPermissionShootsItDown() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        let tlb = SoftTLB()
        mmu.tlbs.register(tlb)
        defer { mmu.tlbs.unregister(tlb) }
        mmu.map(GPARange(start: GPA(0), size: 4096), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        tlb.enterGuest()
        tlb.insert(GFN(0), host: mem.base, permissions: .all)
        let stop = repeatInBackground { tlb.safePoint() }
        mmu.map(GPARange(start: GPA(0), size: 4096), to: mem.base, size: .size4K, permissions: .read, cache: &cache)
        stop()
        #expect(tlb.lookup(GPA(0), Descriptor.write) == nil, "a write permission removed by map must leave the TLB")
        tlb.exitGuest()
        cache.drain()
    }

    @Test func walksStopAtTheIPALimit() throws {
        let mmu = Stage2MMU(ipaBits: 39)
        let mem = try HostMemory(size: 1 << 20, backing: .pages4K)
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 4096), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        #expect(mmu.unmap(GPARange(start: GPA(1 << 39), size: 1 << 20)) == 0)
        #expect(mmu.protect(GPARange(start: GPA(1 << 39), size: 4096), clear: Descriptor.write) == 0)
        #expect(mmu.translate(GPA(0))?.leaf.permissions == .all, "GPA 2^39 must not alias GPA 0")
        cache.drain()
    }

    @Test func discardUnmapsAndZeroes() throws {
        let mmu = Stage2MMU()
        var cache = TableCache(allocator: mmu.allocator)
        let mem = try HostMemory(size: 4 << 20, backing: .thp)
        try mmu.addSlot(id: 0, gpa: GPA(0), size: 4 << 20, memory: mem)
        #expect(mmu.handleFault(GPA(0x20_0000), .write, cache: &cache) == .mapped(.size2M))
        mem.pointer.storeBytes(of: 99, toByteOffset: 0x20_1000, as: UInt64.self)
        try mmu.discard(slot: 0, offset: 0x20_1000, length: 4096)
        #expect(mmu.translate(GPA(0x20_0000)) == nil, "the whole block over the discarded page is unmapped")
        #expect(mem.pointer.load(fromByteOffset: 0x20_1000, as: UInt64.self) == 0)
        #expect(throws: GuestMemoryError.self) { try mmu.discard(slot: 0, offset: 4 << 20, length: 4096) }
        #expect(throws: GuestMemoryError.noSuchSlot(5)) { try mmu.discard(slot: 5, offset: 0, length: 4096) }
        cache.drain()
    }

    @Test func ipa39RejectsHighAddresses() throws {
        let mmu = Stage2MMU(ipaBits: 39)
        let mem = try HostMemory(size: 1 << 20, backing: .pages4K)
        #expect(throws: DirtyLogError.self) { try mmu.addSlot(id: 0, gpa: GPA(1 << 39), size: 1 << 20, memory: mem) }
        try mmu.addSlot(id: 0, gpa: GPA((1 << 39) - (1 << 20)), size: 1 << 20, memory: mem)
        var cache = TableCache(allocator: mmu.allocator)
        #expect(mmu.handleFault(GPA((1 << 39) - 8), .write, cache: &cache) == .mapped(.size4K))
        #expect(mmu.translate(GPA(1 << 39)) == nil)
        cache.drain()
    }
}
