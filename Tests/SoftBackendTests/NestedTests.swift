import Foundation
import Synchronization
import Testing
import DirtyLog
@testable import GuestMemory
@testable import SoftBackend
@testable import Stage2
@testable import Workload

extension SoftVCPU {
    func put(_ gpa: GPA, _ v: UInt64) { enterGuest(); store(gpa, v); exitGuest() }
    func get(_ gpa: GPA) -> UInt64 { enterGuest(); defer { exitGuest() }; return load(gpa) }
}

@Suite(.serialized) struct NestedTests {
    /// L1 with 16 MiB THP RAM at GPA 0; L2 region of L1 memory at 8 MiB.
    func makeL1() throws -> (SoftVM, HostMemory, L1TableBuilder) {
        let vm = SoftVM(vcpus: 1)
        let mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: 16 << 20, backing: .thp)
        return (vm, mem, L1TableBuilder(memory: mem, tablesAt: GPA(0x10_0000)))
    }

    @Test func l2ReachesOnlyWhatL1Mapped() throws {
        let (l1, mem, table) = try makeL1()
        table.map(l2: GPA(0x1000), to: GPA(0x80_0000))
        table.map(l2: GPA(0x2000), to: GPA(0x80_1000), permissions: [.read, .execute])
        let l2 = try SoftVM(nestedIn: l1, lpid: 5, l1Table: table.root, vcpus: 1)
        let v = l2.vcpus[0]
        v.put(GPA(0x1008), 0xABCD)
        #expect(mem.pointer.load(fromByteOffset: 0x80_0008, as: UInt64.self) == 0xABCD, "L2's write lands in L1 memory where L1 mapped it")
        #expect(v.get(GPA(0x1008)) == 0xABCD)
        // Unmapped in L1's table: reflected to L1, no memory touched.
        v.put(GPA(0x3000), 1)
        #expect(v.lastExit == .nestedFault(lpid: 5, GPA(0x3000), .write))
        // Mapped read-only by L1: a write is reflected too, and the page is unchanged.
        v.put(GPA(0x2000), 2)
        #expect(v.lastExit == .nestedFault(lpid: 5, GPA(0x2000), .write))
        #expect(mem.pointer.load(fromByteOffset: 0x80_1000, as: UInt64.self) == 0)
        #expect(throws: NestedError.lpidInUse(5)) { _ = try SoftVM(nestedIn: l1, lpid: 5, l1Table: table.root, vcpus: 1) }
        #expect(throws: NestedError.badLPID(0)) { _ = try SoftVM(nestedIn: l1, lpid: 0, l1Table: table.root, vcpus: 1) }
    }

    @Test func shadowLeafIsTheSmallerOfTheTwoSizes() throws {
        let (l1, _, table) = try makeL1()
        table.map(l2: GPA(0x20_0000), to: GPA(0x80_0000), size: .size2M)   // 2M in L1, 2M THP in L0
        table.map(l2: GPA(0x40_0000), to: GPA(0xA0_0000))                   // 4K in L1
        let l2 = try SoftVM(nestedIn: l1, lpid: 7, l1Table: table.root, vcpus: 1)
        l2.vcpus[0].put(GPA(0x20_1000), 1)
        l2.vcpus[0].put(GPA(0x40_0000), 1)
        let shadow = try #require(l2.shadow)
        #expect(shadow.translate(GPA(0x20_1000))?.level == 2)
        #expect(shadow.translate(GPA(0x40_0000))?.level == 3)
    }

    @Test func l1RemapPlusInvalidateIsSeenByL2() throws {
        let (l1, mem, table) = try makeL1()
        table.map(l2: GPA(0x1000), to: GPA(0x80_0000))
        let l2 = try SoftVM(nestedIn: l1, lpid: 9, l1Table: table.root, vcpus: 1)
        let v = l2.vcpus[0]
        v.put(GPA(0x1000), 1)
        table.map(l2: GPA(0x1000), to: GPA(0x90_0000))
        l2.shadow!.invalidateByL1(GPARange(start: GPA(0x1000), size: 4096))
        v.put(GPA(0x1000), 2)
        #expect(mem.pointer.load(fromByteOffset: 0x80_0000, as: UInt64.self) == 1)
        #expect(mem.pointer.load(fromByteOffset: 0x90_0000, as: UInt64.self) == 2, "L2 sees the new mapping")
        // The old frame's rmap entry went with the invalidation; the new frame has one.
        let rmap = try #require(l1.mmu.nestedRmap(slot: 0))
        #expect(rmap.entries(frame: 0x800).isEmpty && rmap.entries(frame: 0x900).count == 1)
    }

    /// After each kind of L0 invalidation of L1 memory, no L2 access uses the old translation.
    @Test func l0InvalidationsReachTheShadow() throws {
        let (l1, mem, table) = try makeL1()
        for p in 0..<16 as Range<UInt64> { table.map(l2: GPA(p << 12), to: GPA(0x80_0000 + p << 12)) }
        let l2 = try SoftVM(nestedIn: l1, lpid: 3, l1Table: table.root, vcpus: 1)
        let v = l2.vcpus[0], shadow = l2.shadow!
        for p in 0..<16 as Range<UInt64> { v.put(GPA(p << 12), p) }
        #expect(shadow.census().leaves[3] == 16)
        // 1. MMU-notifier discard of L1 memory: shadow leaves go, the page reads back zero.
        try l1.mmu.discard(slot: 0, offset: 0x80_0000, length: 0x2000)
        #expect(shadow.translate(GPA(0)) == nil && shadow.translate(GPA(0x1000)) == nil)
        #expect(v.get(GPA(0)) == 0)
        // 2. Dirty logging of L1 write-protects: the shadow loses write, an L2 write is logged.
        try l1.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .writeProtect))
        #expect(shadow.translate(GPA(0x5000)) == nil)
        v.put(GPA(0x5000), 55)
        var pages: [UInt64] = []
        forEachSetBit(try l1.mmu.getDirtyLog(slot: 0)) { pages.append($0) }
        #expect(pages == [0x805], "the L2 write is in L1's dirty log")
        #expect(mem.pointer.load(fromByteOffset: 0x80_5000, as: UInt64.self) == 55)
        try l1.mmu.disableDirtyLogging(slot: 0)
        // 3. Deleting the slot: nothing of it stays reachable, and its rmap is gone.
        v.put(GPA(0x6000), 66)
        try l1.mmu.deleteSlot(id: 0)
        #expect(shadow.census().leaves.reduce(0, +) == 0)
        #expect(l1.mmu.nestedRmap(slot: 0) == nil)
    }

    @Test func rmapStaysBoundedUnderRepeatedFaultsAndRemaps() throws {
        let (l1, _, table) = try makeL1()
        table.map(l2: GPA(0x1000), to: GPA(0x80_0000))
        let l2 = try SoftVM(nestedIn: l1, lpid: 11, l1Table: table.root, vcpus: 1)
        let v = l2.vcpus[0], shadow = l2.shadow!
        for i in 0..<500 as Range<UInt64> {
            v.put(GPA(0x1000), i)
            // Alternate between two L1 frames, invalidating each time.
            table.map(l2: GPA(0x1000), to: GPA(i % 2 == 0 ? 0x80_1000 : 0x80_0000))
            shadow.invalidateByL1()
            // And a fault on the same page again and again while mapped.
            for _ in 0..<3 { v.put(GPA(0x1000), i) }
            shadow.invalidateByL1()
        }
        let rmap = try #require(l1.mmu.nestedRmap(slot: 0))
        #expect(rmap.census.entries <= 2, "\(rmap.census.entries) rmap entries after 1,000 remaps")
    }

    /// The no-lost-dirty-page invariant with the writers in L2: L1's dirty log (write-protect) plus a
    /// shadow copy of L1 memory equals L1 memory at the end.
    @Test func noLostDirtyPageWithWritersInL2() throws {
        let (l1, mem, table) = try makeL1()
        // L2 RAM: 4 MiB at L2 GPA 0 -> L1 8 MiB, half in 2M blocks, half in 4K pages.
        table.map(l2: GPA(0), to: GPA(0x80_0000), size: .size2M)
        for p in 0..<512 as Range<UInt64> { table.map(l2: GPA(0x20_0000 + p << 12), to: GPA(0xA0_0000 + p << 12)) }
        let l2 = try SoftVM(nestedIn: l1, lpid: 2, l1Table: table.root, vcpus: 2)
        try l2.start(WorkloadSpec(pattern: .uniform, workingSet: 4 << 20, writeFraction: 0.8, seed: 4, stop: .duration(30)))
        Thread.sleep(forTimeInterval: 0.02)
        try l1.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .writeProtect))
        let size = Int(mem.size)
        let shadowCopy = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        defer { shadowCopy.deallocate() }
        shadowCopy.copyMemory(from: mem.pointer, byteCount: size)
        func harvest() throws {
            forEachSetBit(try l1.mmu.getDirtyLog(slot: 0)) { p in
                (shadowCopy + Int(p << 12)).copyMemory(from: mem.pointer + Int(p << 12), byteCount: 4096)
            }
        }
        let deadline = Date().addingTimeInterval(0.4)
        while Date() < deadline { try harvest() }
        try l2.pause()
        try harvest()
        let differing = (0..<(size >> 12)).filter { memcmp(shadowCopy + $0 * 4096, mem.pointer + $0 * 4096, 4096) != 0 }.count
        try l2.resume()
        let stats = try l2.stop()
        #expect(differing == 0, "pages differ from the shadow copy")
        #expect(stats.reduce(0) { $0 + $1.writes } > 10_000)
    }
}
