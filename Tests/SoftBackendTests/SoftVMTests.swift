import Foundation
import Synchronization
import Testing
@testable import GuestMemory
@testable import SoftBackend
@testable import Stage2
@testable import Workload

@Suite(.serialized) struct SoftVMTests {
    @Test func mmioExitReachesTheVMMAndNotTheHost() throws {
        let vm = SoftVM(vcpus: 1)
        try vm.addMemory(slot: 0, gpa: GPA(0), size: 1 << 20, backing: .pages4K)
        let v = vm.vcpus[0]
        let seen = Mutex<[VCPUExit]>([])
        v.exitHandler = { e in seen.withLock { $0.append(e) }; return 0xAB }
        v.enterGuest()
        #expect(v.load(GPA(0xFEC0_0000), size: 4) == 0xAB)
        v.store(GPA(0xFEC0_0010), 0x1234, size: 2)
        v.store(GPA(0x1000), 7)
        #expect(v.load(GPA(0x1000)) == 7)
        v.exitGuest()
        #expect(seen.withLock { $0 } == [.mmio(GPA(0xFEC0_0000), .read, size: 4, value: nil),
                                         .mmio(GPA(0xFEC0_0010), .write, size: 2, value: 0x1234)])
        #expect(v.stats.mmioExits == 2)
        #expect(vm.mmu.translate(GPA(0xFEC0_0000)) == nil)
    }

    @Test func readOnlySlotWritesExit() throws {
        let vm = SoftVM(vcpus: 1)
        let mem = try vm.addMemory(slot: 4, gpa: GPA(1 << 20), size: 1 << 20, backing: .pages4K, flags: .readOnly)
        mem.pointer.storeBytes(of: 0x55, toByteOffset: 0x10, as: UInt64.self)
        let v = vm.vcpus[0]
        v.enterGuest()
        #expect(v.load(GPA((1 << 20) + 0x10)) == 0x55)
        v.store(GPA((1 << 20) + 0x10), 0x66)
        v.exitGuest()
        #expect(v.lastExit == .readOnlyWrite(GPA((1 << 20) + 0x10), slot: 4, size: 8, value: 0x66))
        #expect(mem.pointer.load(fromByteOffset: 0x10, as: UInt64.self) == 0x55)
    }

    @Test func thpGuestGetsBlocksAndDeterministicCounts() throws {
        let vm = SoftVM(vcpus: 2)
        try vm.addMemory(slot: 0, gpa: GPA(0), size: 64 << 20, backing: .thp)
        let spec = WorkloadSpec(pattern: .uniform, workingSet: 64 << 20, writeFraction: 0.5, seed: 3, stop: .count(200_000))
        let stats = try vm.run(spec, timeout: 60)
        let total = stats.reduce(VCPUStats(), +)
        #expect(total.accesses == 400_000)
        #expect(total.mapped[1] > 0 && total.mapped[0] == 0, "a 2M-aligned THP slot maps 2M blocks only")
        #expect(vm.mmu.census().leaves[2] == 32)
        // Each vCPU's writes match its generator's.
        var g = WorkloadGenerator(spec: spec, vcpu: 1)
        var writes: UInt64 = 0
        for _ in 0..<200_000 where g.next().isWrite { writes += 1 }
        #expect(stats[1].writes == writes)
    }

    @Test func pauseStopsAllAccessesUntilResume() throws {
        let vm = SoftVM(vcpus: 2)
        try vm.addMemory(slot: 0, gpa: GPA(0), size: 16 << 20, backing: .pages4K)
        try vm.start(WorkloadSpec(pattern: .uniform, workingSet: 16 << 20, stop: .duration(20)))
        Thread.sleep(forTimeInterval: 0.05)
        try vm.pause()
        let a = vm.vcpus.map(\.stats.accesses)
        Thread.sleep(forTimeInterval: 0.05)
        #expect(vm.vcpus.map(\.stats.accesses) == a, "a paused vCPU makes no access")
        try vm.resume()
        Thread.sleep(forTimeInterval: 0.3)   // long enough that a loaded host has run every vCPU
        let stats = try vm.stop()
        #expect(zip(stats, a).allSatisfy { $0.accesses > $1 })
        #expect(stats.allSatisfy { $0.pauses == 1 })
        #expect(throws: SoftVMError.self) { try vm.pause() }
    }

    /// No stale translation: once deleteSlot or an invalidation start returns, no vCPU write lands in
    /// the old host memory, although the vCPUs keep writing to those addresses as fast as they can.
    @Test func vcpusNeverTouchMemoryAfterUnmapOrInvalidation() throws {
        for round in 0..<4 {
            let vm = SoftVM(vcpus: 2)
            let mem0 = try vm.addMemory(slot: 0, gpa: GPA(0), size: 8 << 20, backing: .thp)
            _ = mem0
            let mem1 = try vm.addMemory(slot: 1, gpa: GPA(1 << 30), size: 8 << 20, backing: round % 2 == 0 ? .thp : .pages4K)
            try vm.start(WorkloadSpec(pattern: .uniform, base: GPA(1 << 30), workingSet: 8 << 20, writeFraction: 1,
                                      seed: UInt64(round), stop: .duration(30)))
            Thread.sleep(forTimeInterval: 0.03)

            // 1. An invalidation of the first half: nothing lands there until it ends, then writes resume.
            let half = HVARange(start: mem1.base, size: 4 << 20)
            vm.mmu.invalidateRangeStart(half)
            let frozen = Data(bytes: mem1.pointer, count: 4 << 20)
            Thread.sleep(forTimeInterval: 0.03)
            let during = Data(bytes: mem1.pointer, count: 4 << 20)
            vm.mmu.invalidateRangeEnd(half)
            #expect(changedWords(frozen, during) == 0, "round \(round): a vCPU wrote to memory under invalidation")
            let resumeBy = Date().addingTimeInterval(10)   // a loaded host may not run a vCPU for a while
            var resumed = 0
            repeat {
                Thread.sleep(forTimeInterval: 0.03)
                resumed = changedWords(frozen, Data(bytes: mem1.pointer, count: 4 << 20))
            } while resumed == 0 && Date() < resumeBy
            #expect(resumed > 0, "round \(round): writes must resume after the invalidation")

            // 2. Deleting the slot: after it returns, the old memory never changes again.
            try vm.mmu.deleteSlot(id: 1)
            let snapshot = Data(bytes: mem1.pointer, count: Int(mem1.size))
            Thread.sleep(forTimeInterval: 0.3)
            let later = Data(bytes: mem1.pointer, count: Int(mem1.size))
            let stats = try vm.stop()
            #expect(changedWords(snapshot, later) == 0, "round \(round): a vCPU wrote through a stale translation after deleteSlot")
            #expect(stats.reduce(0) { $0 + $1.mmioExits } > 0, "accesses to the deleted slot exit as MMIO")
        }
    }
}

/// How many 8-byte words differ between two equally long buffers.
func changedWords(_ a: Data, _ b: Data) -> Int {
    precondition(a.count == b.count)
    return a.withUnsafeBytes { pa in
        b.withUnsafeBytes { pb in
            let wa = pa.bindMemory(to: UInt64.self), wb = pb.bindMemory(to: UInt64.self)
            var n = 0
            for i in 0..<wa.count where wa[i] != wb[i] { n += 1 }
            return n
        }
    }
}
