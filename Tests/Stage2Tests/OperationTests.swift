import Foundation
import Synchronization
import Testing
@testable import GuestMemory
@testable import Stage2

@Suite struct OperationTests {
    @Test(arguments: PageSize.allCases)
    func mapProtectUnmapRoundTrip(size: PageSize) throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        let baseline = mmu.census().tableBytes
        let gpa = GPA(3 << 30)
        let range = GPARange(start: gpa, size: 2 * size.bytes)
        mmu.map(range, to: mem.base, size: size, permissions: .readWrite, cache: &cache)

        for probe in [0, size.bytes - 8, size.bytes + size.bytes / 2, 2 * size.bytes - 1] {
            let t = try #require(mmu.translate(gpa + probe))
            #expect(t.level == size.level)
            #expect(t.hostPage(for: gpa + probe) == mem.base + (probe & ~0xFFF))
            #expect(t.leaf.permissions == .readWrite)
            #expect(t.leaf.has(Descriptor.accessFlag))
        }
        #expect(mmu.translate(gpa + 2 * size.bytes) == nil)
        #expect(mmu.leaf(at: gpa)?.size == size)

        // Protect: write removed, execute added, on exactly the two leaves.
        #expect(mmu.protect(range, set: Descriptor.execute, clear: Descriptor.write) == 2)
        #expect(mmu.translate(gpa)?.leaf.permissions == [.read, .execute])
        #expect(mmu.protect(range, set: Descriptor.write) == 2)
        #expect(mmu.translate(gpa + size.bytes)?.leaf.permissions == .all)

        // Unmap one leaf, then the other: the tables go too.
        #expect(mmu.unmap(GPARange(start: gpa, size: size.bytes)) == 1)
        #expect(mmu.translate(gpa) == nil)
        #expect(mmu.translate(gpa + size.bytes) != nil)
        #expect(mmu.unmap(range) == 1)
        #expect(mmu.translate(gpa + size.bytes) == nil)
        #expect(mmu.census().tableBytes == baseline, "empty tables must be freed")
        cache.drain()
    }

    @Test func unmapOfPartOfABlockUnmapsTheWholeBlock() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 2 << 20), to: mem.base, size: .size2M, permissions: .all, cache: &cache)
        #expect(mmu.unmap(GPARange(start: GPA(0x1000), size: 4096)) == 1)
        #expect(mmu.translate(GPA(0)) == nil && mmu.translate(GPA(0x10_0000)) == nil)
        cache.drain()
    }

    @Test func splitKeepsEveryTranslationAndAttribute() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        let gpa = GPA(1 << 30)
        mmu.map(GPARange(start: gpa, size: 1 << 30), to: mem.base, size: .size1G,
                permissions: [.read, .execute], cache: &cache)
        var before: [UInt64] = []
        for p in stride(from: UInt64(0), to: 1 << 30, by: 4096) {
            before.append(mmu.translate(gpa + p)!.hostPage(for: gpa + p).raw)
        }
        #expect(mmu.split(GPARange(start: gpa, size: 1 << 30), to: .size4K, cache: &cache) == 1 + 512)
        let c = mmu.census()
        #expect(c.leaves[1] == 0 && c.leaves[2] == 0 && c.leaves[3] == 262_144)
        var i = 0
        for p in stride(from: UInt64(0), to: 1 << 30, by: 4096) {
            let t = mmu.translate(gpa + p)!
            #expect(t.level == 3)
            if t.hostPage(for: gpa + p).raw != before[i] { Issue.record("translation of \(gpa + p) changed"); break }
            if t.leaf.permissions != [.read, .execute] { Issue.record("attributes of \(gpa + p) changed"); break }
            #expect(t.leaf.has(Descriptor.swSplit))
            i += 1
        }
        // And back: a full, contiguous table collapses to blocks, bottom-up to 1G.
        #expect(mmu.collapse(GPARange(start: gpa, size: 1 << 30)) == 512 + 1)
        let t = try #require(mmu.translate(gpa + 0x12_3456))
        #expect(t.level == 1 && t.leaf.permissions == [.read, .execute])
        #expect(t.hostPage(for: gpa + 0x12_3456) == mem.base + 0x12_3000)
        mmu.lock.exclusive { mmu.reclaim() }
        #expect(mmu.census().tableBytes == 2 * 4096, "root and one level-1 table remain")
        cache.drain()
    }

    /// A split builds the whole subtree off to the side and swaps it in by one break-before-make: one
    /// shootdown for a 1 GiB block, not one per 2 MiB child (513 before).
    @Test func aSplitIsSwappedInOnce() throws {
        let (mmu, mem) = try makeMMU()
        let tlb = SoftTLB()
        mmu.tlbs.register(tlb)
        defer { mmu.tlbs.unregister(tlb) }
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 1 << 30), to: mem.base, size: .size1G, permissions: .all, cache: &cache)
        let before = mmu.tlbs.shootdowns
        #expect(mmu.split(GPARange(start: GPA(0), size: 1 << 30), to: .size4K, cache: &cache) == 1 + 512)
        #expect(mmu.tlbs.shootdowns - before <= 2, "one break-before-make and one flush, \(mmu.tlbs.shootdowns - before) shootdowns")
        #expect(mmu.census().leaves[3] == 262_144)
        cache.drain()
    }

    @Test func splitOfPartOfABlockSplitsOnlyWhatCoversIt() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 1 << 30), to: mem.base, size: .size1G, permissions: .all, cache: &cache)
        #expect(mmu.split(GPARange(start: GPA(0x20_1000), size: 1), to: .size4K, cache: &cache) == 2)
        let c = mmu.census()
        #expect(c.leaves[1] == 0 && c.leaves[2] == 511 && c.leaves[3] == 512)
        #expect(mmu.translate(GPA(0x20_1000))?.hostPage(for: GPA(0x20_1000)) == mem.base + 0x20_1000)
        #expect(mmu.translate(GPA(0x60_0000))?.level == 2)
        cache.drain()
    }

    @Test func collapseRefusesTablesThatAreNotUniform() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 2 << 20), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        _ = mmu.protect(GPARange(start: GPA(0x5000), size: 4096), clear: Descriptor.write)
        #expect(mmu.collapse(GPARange(start: GPA(0), size: 2 << 20)) == 0)
        _ = mmu.protect(GPARange(start: GPA(0x5000), size: 4096), set: Descriptor.write)
        _ = mmu.unmap(GPARange(start: GPA(0x7000), size: 4096))
        #expect(mmu.collapse(GPARange(start: GPA(0), size: 2 << 20)) == 0, "a hole prevents collapse")
        cache.drain()
    }

    @Test func testAndClearAccessFlag() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 8 * 4096), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        let all = GPARange(start: GPA(0), size: 8 * 4096)
        #expect(mmu.testAndClearYoung(all) == 8)
        #expect(mmu.testAndClearYoung(all) == 0)
        // A vCPU's walk sets it again.
        let t = mmu.translate(GPA(0x3000))!
        _ = t.entry.compareExchange(t.leaf, t.leaf.setting(Descriptor.accessFlag))
        #expect(mmu.testAndClearYoung(all) == 1)
        cache.drain()
    }

    @Test func mappingOverADifferentBlockBreaksBeforeMaking() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        let tlb = SoftTLB()
        mmu.tlbs.register(tlb)
        defer { mmu.tlbs.unregister(tlb) }
        mmu.map(GPARange(start: GPA(0), size: 2 << 20), to: mem.base, size: .size2M, permissions: .all, cache: &cache)
        tlb.insert(GFN(0), host: mem.base, permissions: .all)
        tlb.enterGuest()
        // Remap one 4K page elsewhere: the block is broken (with a shootdown), a table replaces it.
        let shootdowns = mmu.tlbs.shootdowns
        let done = repeatInBackground { tlb.safePoint() }
        mmu.map(GPARange(start: GPA(0), size: 4096), to: mem.base + (4 << 20), size: .size4K, permissions: .all, cache: &cache)
        done()
        tlb.safePoint()
        tlb.exitGuest()
        #expect(mmu.tlbs.shootdowns > shootdowns)
        #expect(tlb.lookup(GPA(0), Descriptor.read) == nil, "the old block translation must be gone")
        #expect(mmu.translate(GPA(0))?.hostPage(for: GPA(0)) == mem.base + (4 << 20))
        #expect(mmu.translate(GPA(0x1000)) == nil, "the rest of the old block faults back in")
        cache.drain()
    }
}

/// Keeps calling `body` on another thread until the returned function is called (so a vCPU keeps
/// reaching safe points while the test thread waits for a shootdown).
func repeatInBackground(_ body: @escaping @Sendable () -> Void) -> () -> Void {
    final class Flag: @unchecked Sendable {
        let stop = Atomic<Bool>(false)
        let done = NSCondition()
        var finished = false
    }
    let flag = Flag()
    let t = Thread {
        while !flag.stop.load(ordering: .acquiring) { body() }
        flag.done.lock(); flag.finished = true; flag.done.signal(); flag.done.unlock()
    }
    t.start()
    return {
        flag.stop.store(true, ordering: .releasing)
        flag.done.lock(); while !flag.finished { flag.done.wait() }; flag.done.unlock()
    }
}
