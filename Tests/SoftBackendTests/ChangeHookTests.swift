import Foundation
import Testing
import DirtyLog
@testable import GuestMemory
@testable import SoftBackend
@testable import Stage2

/// Every descriptor change passes through one hook (Stage2/ChangeHook.swift). These are the changes
/// that once went around it.
@Suite(.serialized) struct ChangeHookTests {
    /// A DBM leaf's W bit is the page's only dirty record: replacing the leaf (an explicit map to other
    /// host memory, break-before-make in an exclusive walk) must move it into the log, not drop it.
    @Test func replacingADirtyDBMLeafKeepsItsDirtyState() throws {
        let vm = SoftVM(vcpus: 1)
        try vm.addMemory(slot: 0, gpa: GPA(0), size: 4 << 20, backing: .pages4K)
        let v = vm.vcpus[0]
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .dbm))
        // A write fault on a page not mapped yet installs a leaf that is dirty at once (DBM and W).
        v.put(GPA(0x5008), 2)
        #expect(vm.mmu.leaf(at: GPA(0x5000))?.descriptor.has(Descriptor.dbm | Descriptor.write) == true, "dirty in the leaf")
        let other = try HostMemory(size: 4096, backing: .pages4K)
        var cache = TableCache(allocator: vm.mmu.allocator)
        vm.mmu.map(GPARange(start: GPA(0x5000), size: 4096), to: other.base, size: .size4K, permissions: .all, cache: &cache)
        cache.drain()
        var pages: [UInt64] = []
        forEachSetBit(try vm.mmu.getDirtyLog(slot: 0)) { pages.append($0) }
        #expect(pages == [5], "the write before the replacement is reported")
    }

    /// Nested shadow leaves are cached translations of L1 memory: when a map replaces the L0 leaf
    /// under them, they must go, or L2 keeps reading the old host page.
    @Test func replacingAnL0LeafInvalidatesNestedShadows() throws {
        let l1 = SoftVM(vcpus: 1)
        let mem = try l1.addMemory(slot: 0, gpa: GPA(0), size: 16 << 20, backing: .pages4K)
        let table = L1TableBuilder(memory: mem, tablesAt: GPA(0x10_0000))
        table.map(l2: GPA(0x1000), to: GPA(0x80_0000))
        let l2 = try SoftVM(nestedIn: l1, lpid: 3, l1Table: table.root, vcpus: 1)
        l1.vcpus[0].put(GPA(0x80_0000), 0x01D)
        #expect(l2.vcpus[0].get(GPA(0x1000)) == 0x01D)
        let other = try HostMemory(size: 4096, backing: .pages4K)
        other.pointer.storeBytes(of: UInt64(0x0E3), as: UInt64.self)
        var cache = TableCache(allocator: l1.mmu.allocator)
        l1.mmu.map(GPARange(start: GPA(0x80_0000), size: 4096), to: other.base, size: .size4K, permissions: .all, cache: &cache)
        cache.drain()
        #expect(l1.vcpus[0].get(GPA(0x80_0000)) == 0x0E3, "L1 sees the new page")
        #expect(l2.vcpus[0].get(GPA(0x1000)) == 0x0E3, "L2 sees the new page, not a stale shadow of the old one")
    }
}
