import Foundation
import Testing
import DirtyLog
@testable import GuestMemory
@testable import KVMBackend
@testable import Stage2
@testable import VirtualMachine
@testable import Workload

/// One piece of code drives both backends through the VirtualMachine interface.
@Suite(.serialized) struct VirtualMachineTests {
    func backends() -> [BackendKind] {
        if case let .failure(e) = KVMSystem.availability() {
            print("KVM TESTS SKIPPED: \(e)")
            return [.soft]
        }
        return BackendKind.allCases
    }

    /// Log, run, add a VMM write, harvest: the same pages on every backend, for wp (manual protect)
    /// and rings.
    @Test(arguments: [DirtyLogConfig(strategy: .writeProtect, manualProtect: true), DirtyLogConfig(strategy: .ring)])
    func sameDirtyPagesThroughTheInterface(_ config: DirtyLogConfig) throws {
        var results: [BackendKind: Set<UInt64>] = [:]
        for backend in backends() {
            // A 256-entry KVM ring fills many times: ring-full exits must lose nothing.
            let vm = try makeVirtualMachine(VMConfig(backend: backend, memory: 8 << 20, backing: .pages4K, vcpus: 2, dirtyRingEntries: 256))
            let spec = WorkloadSpec(pattern: .hotCold(hotFraction: 0.1, hotProbability: 0.9), base: GPA(1 << 20),
                                    workingSet: 4 << 20, writeFraction: 0.3, accessSize: 8, seed: 77, stop: .count(15_000))
            try vm.enableDirtyLogging(config)
            let runs = try vm.run(spec, timeout: 60)
            #expect(runs.count == 2 && runs.allSatisfy { $0.accesses == 15_000 })
            var marker: UInt64 = 0xFEED
            try withUnsafeBytes(of: &marker) { try vm.writeGuest(GPA(0x70_0000), $0) }
            var pages = Set<UInt64>()
            let log = try vm.getDirtyLog()
            forEachSetBit(log) { if $0 >= 256 { pages.insert($0) } }
            if config.manualProtect { try vm.clearDirtyLog(firstPage: 0, bitmap: log) }
            #expect(pages.contains(0x700), "\(backend): the VMM's write is in the log")
            results[backend] = pages
            try vm.disableDirtyLogging()
        }
        if let soft = results[.soft], let kvm = results[.kvm] {
            #expect(soft == kvm, "\(config.strategy): soft \(soft.count) pages, kvm \(kvm.count)")
            print("KVM: VirtualMachine interface, \(config.strategy): \(kvm.count) pages agree")
        }
    }

    @Test func kvmRefusesSoftOnlyStrategies() throws {
        guard backends().contains(.kvm) else { return }
        let vm = try makeVirtualMachine(VMConfig(backend: .kvm, memory: 4 << 20, backing: .pages4K, vcpus: 1))
        #expect(throws: VMError.self) { try vm.enableDirtyLogging(DirtyLogConfig(strategy: .dbm)) }
        #expect(throws: VMError.self) { _ = try vm.run(WorkloadSpec(base: GPA(0), workingSet: 1 << 20, stop: .count(10)), timeout: 5) }
    }
}
