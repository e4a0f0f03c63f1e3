import Foundation
import Testing
import DirtyLog
@testable import GuestMemory
@testable import KVMBackend
@testable import SoftBackend
@testable import Stage2
@testable import Workload

/// The same workload spec on the kvm backend (the kernel's MMU, real x86 code) and on the soft
/// backend (our MMU) must dirty the same pages. The guest program's own pages, all below 1 MiB, are
/// left out.
@Suite(.serialized) struct DifferentialTests {
    static let patterns: [AccessPattern] = [.sequential, .uniform, .zipfian(theta: 0.99), .hotCold(hotFraction: 0.1, hotProbability: 0.9)]
    static let cases: [(AccessPattern, UInt64)] = patterns.flatMap { p in (1...5).map { (p, UInt64($0) * 7919) } }

    static let memory: UInt64 = 8 << 20
    static let firstWorkloadPage = X86Layout.reservedEnd.raw >> 12

    func pages(_ bitmap: [UInt64]) -> Set<UInt64> {
        var out = Set<UInt64>()
        forEachSetBit(bitmap) { if $0 >= Self.firstWorkloadPage { out.insert($0) } }
        return out
    }

    @Test(arguments: cases.indices)
    func kvmAndSoftDirtyTheSamePages(_ i: Int) throws {
        let (pattern, seed) = Self.cases[i]
        let spec = WorkloadSpec(pattern: pattern, base: X86Layout.reservedEnd, workingSet: 4 << 20, writeFraction: 0.3,
                                accessSize: 8, seed: seed, stop: .count(20_000))
        guard kvmUsable() else { return }
        // kvm
        let kvm = try KVMSystem()
        let vm = try KVMVM(system: kvm)
        let kmem = try HostMemory(size: Self.memory, backing: .pages4K)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: kmem, logDirty: true)
        let vcpu = try vm.createVCPU(id: 0)
        try vcpu.loadWorkload(spec, index: 0, memory: kmem)
        let kstats = try vcpu.runWorkload(index: 0, memory: kmem, timeout: 60)
        let kvmPages = pages(try vm.getDirtyLog(slot: 0))

        // soft
        let soft = SoftVM(vcpus: 1)
        try soft.addMemory(slot: 0, gpa: GPA(0), size: Self.memory, backing: .pages4K)
        try soft.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .writeProtect))
        let sstats = try soft.run(spec, timeout: 60)
        let softPages = pages(try soft.mmu.getDirtyLog(slot: 0))

        #expect(kstats.accesses == 20_000 && kstats.writes == sstats[0].writes, "\(pattern) seed \(seed): same stream")
        #expect(kvmPages == softPages, "\(pattern) seed \(seed): kvm \(kvmPages.count) pages, soft \(softPages.count), differing \(kvmPages.symmetricDifference(softPages).count)")
        #expect(!softPages.isEmpty)
        // The data agree too: the last value each backend stored in every word.
        let a = kmem.pointer + Int(X86Layout.reservedEnd.raw), b = soft.mmu.memslots.memory(forSlot: 0)!.pointer + Int(X86Layout.reservedEnd.raw)
        #expect(memcmp(a, b, Int(spec.workingSet)) == 0, "\(pattern) seed \(seed): guest memory differs")
        print("KVM: differential \(pattern) seed \(seed): \(softPages.count) pages agree")
    }
}

@Suite(.serialized) struct KVMDirtyRingTests {
    /// With a 256-entry ring the guest fills it several times: each full ring exits, the VMM harvests
    /// and resets, and the union of the harvests equals the soft backend's dirty log.
    @Test(arguments: [AccessPattern.uniform, .zipfian(theta: 0.99)])
    func ringHarvestsMatchSoftBackend(_ pattern: AccessPattern) throws {
        guard kvmUsable() else { return }
        let spec = WorkloadSpec(pattern: pattern, base: X86Layout.reservedEnd, workingSet: 4 << 20, writeFraction: 0.5,
                                accessSize: 8, seed: 11, stop: .count(30_000))
        let kvm = try KVMSystem()
        let vm = try KVMVM(system: kvm)
        try vm.enableDirtyRing(bytes: 4096)
        let mem = try HostMemory(size: 8 << 20, backing: .pages4K)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem, logDirty: true)
        let vcpu = try vm.createVCPU(id: 0)
        let ring = try #require(vcpu.dirtyRing)
        #expect(ring.entries == 256)
        var pages = Set<UInt64>()
        var fulls = 0
        func harvest() throws(KVMError) {
            _ = ring.harvest { slot, page in if slot == 0 && page >= 256 { pages.insert(page) } }
            try vm.resetDirtyRings()
        }
        try vcpu.loadWorkload(spec, index: 0, memory: mem)
        _ = try vcpu.runWorkload(index: 0, memory: mem, timeout: 60) { () throws(KVMError) in
            fulls += 1
            try harvest()
        }
        try harvest()

        let soft = SoftVM(vcpus: 1)
        try soft.addMemory(slot: 0, gpa: GPA(0), size: 8 << 20, backing: .pages4K)
        try soft.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .ring))
        _ = try soft.run(spec, timeout: 60)
        var softPages = Set<UInt64>()
        for e in soft.mmu.harvestDirtyRings() where e.page >= 256 { softPages.insert(e.page) }

        #expect(fulls >= 2, "the small ring must fill and exit")
        #expect(pages == softPages, "\(pattern): kvm ring \(pages.count) pages, soft ring \(softPages.count)")
        print("KVM: dirty ring \(pattern): \(pages.count) pages agree after \(fulls) ring-full exits")
    }
}

@Suite(.serialized) struct KVMMultiVCPUTests {
    /// Two vCPUs, each with its own stream: the pages dirtied are the union of both streams whatever
    /// the interleaving, so KVM and the soft backend must agree on them.
    @Test func twoVCPUsDirtyTheSamePagesOnBothBackends() throws {
        guard kvmUsable() else { return }
        let spec = WorkloadSpec(pattern: .zipfian(theta: 0.9), base: X86Layout.reservedEnd, workingSet: 4 << 20,
                                writeFraction: 0.4, accessSize: 8, seed: 5, stop: .count(20_000))
        let kvm = try KVMSystem()
        let vm = try KVMVM(system: kvm)
        let mem = try HostMemory(size: 8 << 20, backing: .pages4K)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem, logDirty: true)
        let vcpus = [try vm.createVCPU(id: 0), try vm.createVCPU(id: 1)]
        for (i, v) in vcpus.enumerated() { try v.loadWorkload(spec, index: i, memory: mem) }
        let failures = FailureBox()
        runOnThreads(2) { i in
            do { _ = try vcpus[i].runWorkload(index: i, memory: mem, timeout: 60) } catch { failures.add("\(error)") }
        }
        #expect(failures.all.isEmpty, "\(failures.all)")
        var kvmPages = Set<UInt64>()
        forEachSetBit(try vm.getDirtyLog(slot: 0)) { if $0 >= 256 { kvmPages.insert($0) } }

        let soft = SoftVM(vcpus: 2)
        try soft.addMemory(slot: 0, gpa: GPA(0), size: 8 << 20, backing: .pages4K)
        try soft.mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: .dbm))
        _ = try soft.run(spec, timeout: 60)
        var softPages = Set<UInt64>()
        forEachSetBit(try soft.mmu.getDirtyLog(slot: 0)) { if $0 >= 256 { softPages.insert($0) } }
        #expect(kvmPages == softPages, "kvm \(kvmPages.count) pages, soft \(softPages.count)")
        print("KVM: two vCPUs, \(kvmPages.count) pages agree")
    }
}

final class FailureBox: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [String] = []
    func add(_ s: String) { lock.lock(); items.append(s); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return items }
}
