import Foundation
import Synchronization
import Testing
import DirtyLog
@testable import GuestMemory
@testable import SoftBackend
@testable import Stage2

/// Behaviour of each strategy with one vCPU driven from the test thread.
@Suite struct DirtyLogTests {
    /// A VM with one slot at GPA 0, every page mapped by a first pass of writes, vCPU in guest mode.
    func makeVM(_ backing: Backing, size: UInt64 = 8 << 20) throws -> (SoftVM, SoftVCPU, HostMemory) {
        let vm = SoftVM(vcpus: 1)
        let mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: size, backing: backing)
        let v = vm.vcpus[0]
        for p in stride(from: UInt64(0), to: size, by: 4096) { v.write(GPA(p), 1) }
        return (vm, v, mem)
    }

    func pages(_ bitmap: [UInt64]) -> [UInt64] {
        var out: [UInt64] = []
        forEachSetBit(bitmap) { out.append($0) }
        return out
    }

    @Test(arguments: [DirtyStrategy.writeProtect, .eagerSplit, .dbm, .ring])
    func onlyWrittenPagesAreReported(strategy: DirtyStrategy) throws {
        let (vm, v, _) = try makeVM(.thp)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: strategy))
        let written: [UInt64] = [3, 4, 700, 1500]
        for p in written { v.write(GPA(p << 12 + 8), p) }
        for p in [10, 900] as [UInt64] { v.read(GPA(p << 12)) }
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == written, "\(strategy)")
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [], "a second harvest reports nothing new")
        // Re-protected: the next write to a reported page is seen again.
        v.write(GPA(700 << 12), 1)
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [700])
        // A write to a protected block split only that block; the others stay 2M (except where blocks
        // split ahead: eager split, and DBM, whose writes must not fault).
        let census = vm.mmu.census()
        if strategy == .eagerSplit || strategy == .dbm {
            #expect(census.leaves[2] == 0)
        } else {
            #expect(census.leaves[2] == 1, "blocks 0, 1 and 2 were written and split, block 3 was not")
        }
        try vm.mmu.disableDirtyLogging(slot: 0)
    }

    @Test func blockGranularKeepsBlocksAndReportsThemWhole() throws {
        let (vm, v, _) = try makeVM(.thp)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .blockGranular))
        let faults = v.stats.faults
        v.write(GPA(0x20_5000), 1)
        v.write(GPA(0x20_6000), 1)    // same block: no second fault
        #expect(v.stats.faults == faults + 1)
        let reported = pages(try vm.mmu.getDirtyLog(slot: 0))
        #expect(reported == Array(512..<1024), "the whole 2M block, and nothing else")
        #expect(vm.mmu.census().leaves[2] == 4, "blocks stay mapped")
        #expect(vm.mmu.translate(GPA(0x20_0000))?.leaf.has(Descriptor.write) == false, "re-protected")
    }

    @Test func dbmWritesTakeNoFault() throws {
        let (vm, v, _) = try makeVM(.pages4K)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .dbm))
        let faults = v.stats.faults
        for p in 0..<100 as Range<UInt64> { v.write(GPA(p << 12), p) }
        #expect(v.stats.faults == faults, "the vCPU sets the dirty state itself")
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == Array(0..<100))
        #expect(vm.mmu.translate(GPA(0))?.leaf.has(Descriptor.write) == false, "cleaned by the harvest")
        #expect(vm.mmu.translate(GPA(0))?.leaf.has(Descriptor.dbm) == true)
        v.write(GPA(5 << 12), 1)
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [5])
    }

    /// Long walks hold the MMU lock a chunk at a time: at each chunk boundary of a get, a clear and an
    /// enable over 256 MiB, a write fault on another thread, into a chunk already re-protected, gets
    /// through (with the lock held for the whole slot it would wait, and the wait time out).
    @Test func faultsGetInBetweenChunksOfALongWalk() throws {
        let vm = SoftVM(vcpus: 1)
        let size: UInt64 = 256 << 20
        try vm.addMemory(slot: 0, gpa: GPA(0), size: size, backing: .pages4K)
        let v = vm.vcpus[0]
        func writeAll(_ value: UInt64) {
            v.enterGuest()
            for p in stride(from: UInt64(0), to: size, by: 4096) { v.store(GPA(p), value) }
            v.exitGuest()
        }
        writeAll(1)
        // At boundary k, page 7 of chunk k (the walk has re-protected it) takes a write fault.
        let boundaries = Mutex<[Bool]>([])
        let probe: @Sendable () -> Void = {
            let k = UInt64(boundaries.withLock { $0.count } % Int(size >> 12 / Stage2MMU.lockChunkPages))
            let done = DispatchSemaphore(value: 0)
            Thread { v.put(GPA((k * Stage2MMU.lockChunkPages + 7) << 12), 9); done.signal() }.start()
            let ok = done.wait(timeout: .now() + 5) == .success
            boundaries.withLock { $0.append(ok) }
        }
        vm.mmu.chunkBoundaryHook = probe
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .writeProtect, manualProtect: true))
        vm.mmu.chunkBoundaryHook = nil
        writeAll(2)
        vm.mmu.chunkBoundaryHook = probe
        let log = try vm.mmu.getDirtyLog(slot: 0)
        try vm.mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: log)
        vm.mmu.chunkBoundaryHook = nil
        let seen = boundaries.withLock { $0 }
        #expect(seen.count >= 2 * Int(size >> 12 / Stage2MMU.lockChunkPages), "\(seen.count) chunk boundaries")
        #expect(seen.allSatisfy { $0 }, "a fault between chunks waited for the walk")
    }

    @Test func manualProtectReprotectsOnlyWhatIsCleared() throws {
        let (vm, v, _) = try makeVM(.pages4K)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .writeProtect, manualProtect: true))
        for p in [1, 2, 65, 66] as [UInt64] { v.write(GPA(p << 12), 1) }
        let log = try vm.mmu.getDirtyLog(slot: 0)
        #expect(pages(log) == [1, 2, 65, 66])
        // Not cleared yet: a second get reports the same pages (KVM's manual protect), written again or not.
        v.write(GPA(1 << 12), 2)
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [1, 2, 65, 66])
        // Clear only the second word (pages 64...127): 65 and 66 are forgotten and protected again.
        try vm.mmu.clearDirtyLog(slot: 0, firstPage: 64, bitmap: [log[1]])
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [1, 2])
        #expect(vm.mmu.leaf(at: GPA(65 << 12))?.descriptor.permissions.contains(.write) == false)
        #expect(vm.mmu.leaf(at: GPA(1 << 12))?.descriptor.permissions.contains(.write) == true)
        for p in [65, 66] as [UInt64] { v.write(GPA(p << 12), 3) }
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [1, 2, 65, 66])
        #expect(throws: DirtyLogError.unalignedClear(firstPage: 3)) { try vm.mmu.clearDirtyLog(slot: 0, firstPage: 3, bitmap: [1]) }
        #expect(throws: DirtyLogError.self) { try vm.mmu.clearDirtyLog(slot: 0, firstPage: 4096, bitmap: [1]) }
    }

    @Test func initiallySetReportsEverythingAndProtectsNothing() throws {
        let (vm, v, _) = try makeVM(.pages4K)
        #expect(throws: DirtyLogError.initiallySetNeedsManualProtect) {
            try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .writeProtect, initiallySet: true))
        }
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .writeProtect, manualProtect: true, initiallySet: true))
        let faults = v.stats.faults
        v.write(GPA(0x3000), 9)
        #expect(v.stats.faults == faults, "nothing is protected yet")
        let all = try vm.mmu.getDirtyLog(slot: 0)
        #expect(pages(all).count == 2048)
        try vm.mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: all)
        v.write(GPA(0x3000), 10)
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [3])
    }

    @Test func eagerSplitUsesThePrefilledCache() throws {
        let (vm, v, _) = try makeVM(.thp)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .eagerSplit))
        #expect(vm.mmu.dirtyLog(slot: 0)?.splitTablesUsed == 4)
        #expect(vm.mmu.census().leaves[2] == 0 && vm.mmu.census().leaves[3] == 2048)
        let faults = v.stats.faults
        v.write(GPA(0x40_0000), 1)
        #expect(v.stats.faults == faults + 1, "one write-protect fault, no split inside it")
    }

    @Test func ringCollectsPagesAndResetReprotects() throws {
        let (vm, v, _) = try makeVM(.pages4K)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .ring))
        for p in [7, 8, 9] as [UInt64] { v.write(GPA(p << 12), 1) }
        v.write(GPA(7 << 12), 2)   // already dirty and writable: no new entry
        #expect(vm.mmu.harvestDirtyRings().map(\.page) == [7, 8, 9])
        #expect(vm.mmu.harvestDirtyRings().isEmpty)
        #expect(vm.mmu.resetDirtyRings() == 3)
        v.write(GPA(8 << 12), 3)
        #expect(vm.mmu.harvestDirtyRings() == [DirtyRingEntry(slot: 0, page: 8)])
    }

    /// Ring entries harvested before the slot's logging turned to DBM must not be reset onto it (found
    /// in review): under DBM a page's only dirty record is its leaf's W bit, which the re-protect of a
    /// reset would forget.
    @Test(arguments: [Backing.pages4K, .thp])
    func aStaleRingResetLeavesADBMSlotsPagesDirty(backing: Backing) throws {
        let (vm, v, _) = try makeVM(backing)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .ring))
        v.write(GPA(5 << 12), 1)
        #expect(vm.mmu.harvestDirtyRings().map(\.page) == [5])   // harvested, not yet reset
        try vm.mmu.disableDirtyLogging(slot: 0)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .dbm))
        v.write(GPA(5 << 12), 2)
        #expect(vm.mmu.resetDirtyRings() == 1, "the entry's room is freed")
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [5])
    }

    @Test func fullRingStopsTheVCPUUntilReset() throws {
        let vm = SoftVM(vcpus: 1, ringCapacity: 64)
        try vm.addMemory(slot: 0, gpa: GPA(0), size: 4 << 20, backing: .pages4K)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .ring))
        let v = vm.vcpus[0]
        let capacity = v.ring.capacity
        let done = DispatchSemaphore(value: 0)
        Thread {
            v.enterGuest()
            for p in 0..<UInt64(capacity + 10) { v.store(GPA(p << 12), p) }
            v.exitGuest()
            done.signal()
        }.start()
        #expect(done.wait(timeout: .now() + 0.5) == .timedOut, "the vCPU must wait on a full ring")
        #expect(v.ring.count == capacity)
        _ = vm.mmu.harvestDirtyRings()
        vm.mmu.resetDirtyRings()
        #expect(done.wait(timeout: .now() + 10) == .success)
        #expect(v.stats.ringFullExits >= 1)
    }

    @Test func vmmWritesAreRecorded() throws {
        let (vm, _, mem) = try makeVM(.pages4K)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .dbm))
        let bytes = [UInt8](repeating: 0xAB, count: 5000)
        try bytes.withUnsafeBytes { try vm.mmu.writeGuest(GPA(0x10_0F00), $0) }
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [0x100, 0x101, 0x102])
        #expect(mem.pointer.load(fromByteOffset: 0x10_1000, as: UInt8.self) == 0xAB)
        #expect(throws: DirtyLogError.self) { try bytes.withUnsafeBytes { try vm.mmu.writeGuest(GPA((8 << 20) - 16), $0) } }
    }

    /// Under DBM a page's only dirty record is its leaf: taking the leaf away (an invalidation) must
    /// move that record into the bitmap.
    @Test func dbmDirtyStateSurvivesUnmap() throws {
        let (vm, v, _) = try makeVM(.pages4K)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .dbm))
        v.write(GPA(0x5000), 7)
        try vm.mmu.discard(slot: 0, offset: 0x4000, length: 0x4000)
        #expect(pages(try vm.mmu.getDirtyLog(slot: 0)) == [5])
        #expect(throws: DirtyLogError.readOnlyAndLogging(0)) { try vm.mmu.setSlotFlags(id: 0, [.dirtyLogging, .readOnly]) }
        // Flags are set as given: logging stops, then the slot turns read-only.
        try vm.mmu.setSlotFlags(id: 0, [.readOnly])
        #expect(vm.mmu.dirtyLog(slot: 0) == nil && vm.mmu.memslots.slot(id: 0)?.flags == [.readOnly])
    }

    @Test func ringHarvestIncludesVMMWrites() throws {
        let (vm, v, _) = try makeVM(.pages4K)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .ring))
        v.write(GPA(0x2000), 1)
        var x: UInt64 = 5
        try withUnsafeBytes(of: &x) { try vm.mmu.writeGuest(GPA(0x9000), $0) }
        #expect(Set(vm.mmu.harvestDirtyRings().map(\.page)) == [2, 9])
    }

    @Test func disablingLetsBlocksComeBack() throws {
        let (vm, v, _) = try makeVM(.thp)
        try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .eagerSplit))
        #expect(vm.mmu.census().leaves[2] == 0)
        try vm.mmu.disableDirtyLogging(slot: 0)
        for p in stride(from: UInt64(0), to: 8 << 20, by: 4096) { v.write(GPA(p), 2) }
        #expect(vm.mmu.census().leaves[2] == 4, "later faults map 2M blocks again")
        #expect(throws: DirtyLogError.notLogging(slot: 0)) { try vm.mmu.disableDirtyLogging(slot: 0) }
    }

    @Test func badRequests() throws {
        let vm = SoftVM(vcpus: 1)
        try vm.addMemory(slot: 0, gpa: GPA(0), size: 1 << 20, backing: .pages4K, flags: .readOnly)
        #expect(throws: DirtyLogError.readOnlySlot(0)) { try vm.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .dbm)) }
        #expect(throws: DirtyLogError.memory(.noSuchSlot(3))) { try vm.mmu.enableDirtyLogging(slot: 3, DirtyLogConfig(strategy: .dbm)) }
        #expect(throws: DirtyLogError.notLogging(slot: 0)) { _ = try vm.mmu.getDirtyLog(slot: 0) }
        try vm.addMemory(slot: 1, gpa: GPA(1 << 20), size: 1 << 20, backing: .pages4K)
        try vm.mmu.enableDirtyLogging(slot: 1, DirtyLogConfig(strategy: .dbm))
        #expect(throws: DirtyLogError.alreadyLogging(slot: 1)) { try vm.mmu.enableDirtyLogging(slot: 1, DirtyLogConfig(strategy: .ring)) }
    }
}

extension SoftVCPU {
    /// One guest store, entering and leaving guest mode around it, so that the test thread can run
    /// MMU operations (whose shootdowns wait for vCPUs in guest mode) between accesses.
    func write(_ gpa: GPA, _ value: UInt64) {
        enterGuest()
        store(gpa, value)
        exitGuest()
    }

    func read(_ gpa: GPA) {
        enterGuest()
        _ = load(gpa)
        exitGuest()
    }
}
