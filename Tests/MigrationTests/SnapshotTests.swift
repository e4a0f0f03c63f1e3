import Foundation
import Glibc
import Testing
@testable import GuestMemory
@testable import Migration
@testable import SoftBackend
@testable import Stage2
@testable import VirtualMachine
@testable import Workload

@Suite(.serialized) struct SnapshotTests {
    let dir: String

    init() throws {
        dir = NSTemporaryDirectory() + "vmm-snap-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    func runningVM() throws -> (any VirtualMachine, WorkloadSpec) {
        let vm = try makeVirtualMachine(VMConfig(backend: .soft, memory: 16 << 20, backing: .pages4K, vcpus: 2))
        let spec = WorkloadSpec(pattern: .hotCold(hotFraction: 0.05, hotProbability: 0.95), workingSet: 16 << 20,
                                writeFraction: 0.2, rate: 50_000, seed: 8, stop: .duration(60))
        try vm.start(spec, from: nil)
        Thread.sleep(forTimeInterval: 0.05)
        return (vm, spec)
    }

    /// A full snapshot and two diffs of a running guest (with a VMM write between) restore into a new
    /// VM whose memory matches the last snapshot's digest, and the guest goes on from there.
    @Test func chainRestoresAndTheGuestContinues() throws {
        let (vm, spec) = try runningVM()
        let chain = SnapshotChain(vm: vm, spec: spec)
        let base = try chain.take(to: dir + "/base")
        Thread.sleep(forTimeInterval: 0.05)
        var marker: UInt64 = 0xC0FFEE
        try withUnsafeBytes(of: &marker) { try vm.writeGuest(GPA(0xF0_0000), $0) }
        let d1 = try chain.take(to: dir + "/d1")
        Thread.sleep(forTimeInterval: 0.05)
        let d2 = try chain.take(to: dir + "/d2")
        chain.finish()
        _ = try vm.stop()
        #expect(!base.diff && d1.diff && d2.diff)
        #expect(base.pages == vm.pages)
        #expect(d1.pages < base.pages / 2, "a diff holds only dirtied pages (\(d1.pages) of \(base.pages))")

        let (restored, spec2, state) = try restoreSnapshots([dir + "/base", dir + "/d1", dir + "/d2"])
        #expect(spec2 == spec)
        #expect(restored.memory.pointer.load(fromByteOffset: 0xF0_0000, as: UInt64.self) == 0xC0FFEE, "the VMM's write is in the chain")
        try restored.start(spec2, from: state)
        Thread.sleep(forTimeInterval: 0.05)
        let runs = try restored.stop()
        #expect(runs.allSatisfy { $0.accesses > 0 }, "the restored guest runs on")
        #expect(throws: MigrationError.self) { _ = try restoreSnapshots([dir + "/base", dir + "/d2"]) }
        #expect(throws: MigrationError.self) { _ = try restoreSnapshots([dir + "/d1"]) }
    }

    /// A diff that fails to write loses nothing: its pages go into the next diff.
    @Test func failedDiffIsReportedByTheNextOne() throws {
        let (vm, spec) = try runningVM()
        let chain = SnapshotChain(vm: vm, spec: spec)
        try chain.take(to: dir + "/base")
        var marker: UInt64 = 0xBEEF
        try withUnsafeBytes(of: &marker) { try vm.writeGuest(GPA(0x80_0000), $0) }
        #expect(throws: (any Error).self) { try chain.take(to: dir + "/no-such-dir/d1") }
        let d1 = try chain.take(to: dir + "/d1")
        chain.finish()
        _ = try vm.stop()
        #expect(d1.pages > 0)
        let (restored, _, _) = try restoreSnapshots([dir + "/base", dir + "/d1"])
        #expect(restored.memory.pointer.load(fromByteOffset: 0x80_0000, as: UInt64.self) == 0xBEEF)
    }

    @Test func corruptOrTruncatedSnapshotsAreRefused() throws {
        let (vm, spec) = try runningVM()
        let chain = SnapshotChain(vm: vm, spec: spec)
        try chain.take(to: dir + "/base")
        chain.finish()
        _ = try vm.stop()
        var bytes = try Data(contentsOf: URL(fileURLWithPath: dir + "/base"))
        bytes[bytes.count / 2] ^= 0x10
        try bytes.write(to: URL(fileURLWithPath: dir + "/flipped"))
        #expect(throws: MigrationError.self) { _ = try restoreSnapshots([dir + "/flipped"]) }
        try bytes.prefix(bytes.count - 100).write(to: URL(fileURLWithPath: dir + "/truncated"))
        #expect(throws: MigrationError.self) { _ = try restoreSnapshots([dir + "/truncated"]) }
    }
}
