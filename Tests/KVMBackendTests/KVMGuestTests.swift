import Foundation
import Workload
import Stage2
import Testing
@testable import GuestMemory
@testable import KVMBackend

/// These tests need /dev/kvm. Where it cannot be opened they print "KVM TESTS SKIPPED" with the reason,
/// and .ci/run fails if /dev/kvm exists but that line appears.
@Suite struct KVMGuestTests {
    func system() -> KVMSystem? {
        switch KVMSystem.availability() {
        case .success: return try? KVMSystem()
        case let .failure(e):
            print("KVM TESTS SKIPPED: \(e)")
            return nil
        }
    }

    @Test func capabilitiesAreReported() throws {
        guard let kvm = system() else { return }
        #expect(kvm.capability(.userMemory) > 0)
        #expect(kvm.vcpuMmapSize >= 4096)
        #expect(throws: KVMError.capabilityMissing("an impossible capability")) {
            try kvm.require(KVMCapability(raw: 1_000_000, name: "an impossible capability"))
        }
        print("KVM: capabilities checked (manual protect \(kvm.capability(.manualDirtyLogProtect2)), dirty ring \(kvm.capability(.dirtyLogRing)) bytes)")
    }

    @Test func missingDeviceIsAClearError() {
        guard case let .failure(e) = KVMSystem.availability(path: "/dev/no-such-kvm") else {
            Issue.record("opening a missing device succeeded")
            return
        }
        #expect(e == .noDevice("/dev/no-such-kvm"))
        #expect(e.description.contains("--backend soft"))
    }

    /// A CPL3 64-bit guest writes guest memory and reports through port IO.
    @Test func longModeUserGuestRunsNatively() throws {
        guard let kvm = system() else { return }
        let vm = try KVMVM(system: kvm)
        let memory = try HostMemory(size: 4 << 20, backing: .pages4K)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: memory)
        let program: [UInt8] = [
            0x66, 0xBA, 0x10, 0x00,                         // mov dx, 0x10
            0xB0, 0x42,                                     // mov al, 0x42
            0xEE,                                           // out dx, al
            0x48, 0xC7, 0xC3, 0x00, 0x00, 0x20, 0x00,       // mov rbx, 0x200000
            0x48, 0xC7, 0x03, 0x55, 0x00, 0x00, 0x00,       // mov qword [rbx], 0x55
            0x66, 0xBA, 0x11, 0x00,                         // mov dx, 0x11
            0xEE,                                           // out dx, al
            0xEB, 0xFE,                                     // jmp $
        ]
        program.withUnsafeBytes { memory.pointer.advanced(by: Int(X86Layout.code.raw)).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        let vcpu = try vm.createVCPU(id: 0)
        try vcpu.enterLongModeUser(memory: memory, entry: X86Layout.code)
        #expect(try vcpu.run() == .io(port: 0x10, write: true, size: 1, data: 0x42))
        #expect(try vcpu.run() == .io(port: 0x11, write: true, size: 1, data: 0x42))
        #expect(memory.pointer.load(fromByteOffset: 0x20_0000, as: UInt64.self) == 0x55)
        let s = try vcpu.specialRegisters()
        #expect(s.cs.dpl == 3 && s.cs.l == 1, "the guest runs at CPL3 in 64-bit mode")
        print("KVM: ran a CPL3 long-mode guest (rip \(String(try vcpu.registers().rip, radix: 16)))")
    }
}

@Suite struct KVMWorkloadTests {
    /// A run split in two chunks continues the same stream: memory ends up as after one run.
    @Test func chunkedRunContinuesTheStream() throws {
        guard kvmUsable() else { return }
        let kvm = try KVMSystem()
        func run(_ chunks: [UInt64]) throws -> HostMemory {
            let vm = try KVMVM(system: kvm)
            let mem = try HostMemory(size: 4 << 20, backing: .pages4K)
            try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem)
            let vcpu = try vm.createVCPU(id: 0)
            for (i, n) in chunks.enumerated() {
                let spec = WorkloadSpec(pattern: .sequential, base: X86Layout.reservedEnd, workingSet: 2 << 20,
                                        writeFraction: 0.5, accessSize: 4, seed: 3, stop: .count(n))
                try vcpu.loadWorkload(spec, index: 0, memory: mem, continuing: i > 0)
                _ = try vcpu.runWorkload(index: 0, memory: mem, timeout: 30)
            }
            return mem
        }
        let one = try run([300_000]), two = try run([100_000, 200_000])
        #expect(memcmp(one.pointer + 0x10_0000, two.pointer + 0x10_0000, 2 << 20) == 0)
        print("KVM: chunked run continued the stream")
    }

    @Test func workloadOutsideTheGuestAreaIsRefused() throws {
        guard kvmUsable() else { return }
        let vm = try KVMVM(system: try KVMSystem())
        let mem = try HostMemory(size: 4 << 20, backing: .pages4K)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem)
        let vcpu = try vm.createVCPU(id: 0)
        #expect(throws: KVMError.self) { try vcpu.loadWorkload(WorkloadSpec(base: GPA(0), workingSet: 1 << 20, stop: .count(10)), index: 0, memory: mem) }
        #expect(throws: KVMError.self) { try vcpu.loadWorkload(WorkloadSpec(base: GPA(1 << 20), workingSet: 8 << 20, stop: .count(10)), index: 0, memory: mem) }
    }
}

@Suite struct KVMStateTests {
    /// Stop a guest mid-run at a progress exit, copy its memory and vCPU state into a second VM, and
    /// let it finish there: memory ends exactly as after an uninterrupted run.
    @Test func guestContinuesInAnotherVMFromSavedState() throws {
        guard kvmUsable() else { return }
        let kvm = try KVMSystem()
        let spec = WorkloadSpec(pattern: .uniform, base: X86Layout.reservedEnd, workingSet: 2 << 20, writeFraction: 0.5,
                                accessSize: 8, seed: 21, stop: .count(200_000))
        func newVM() throws -> (KVMVM, KVMVCPU, HostMemory) {
            let vm = try KVMVM(system: kvm)
            let mem = try HostMemory(size: 4 << 20, backing: .pages4K)
            try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem)
            return (vm, try vm.createVCPU(id: 0), mem)
        }
        // Reference: one uninterrupted run.
        let (_, refCPU, refMem) = try newVM()
        try refCPU.loadWorkload(spec, index: 0, memory: refMem)
        _ = try refCPU.runWorkload(index: 0, memory: refMem, timeout: 30)

        // Source: run to the first progress exit (65,536 accesses), then save.
        let (_, src, srcMem) = try newVM()
        try src.loadWorkload(spec, index: 0, memory: srcMem)
        #expect(try src.run() == .io(port: 0x10, write: true, size: 4, data: 65536))
        let state = try src.saveState()

        // Destination: same memory, restored state, run on.
        let (_, dst, dstMem) = try newVM()
        dstMem.pointer.copyMemory(from: srcMem.pointer, byteCount: Int(srcMem.size))
        try dst.restoreState(state)
        let stats = try dst.runWorkload(index: 0, memory: dstMem, timeout: 30)
        #expect(stats.accesses == 200_000)
        #expect(memcmp(dstMem.pointer + 0x10_0000, refMem.pointer + 0x10_0000, 2 << 20) == 0,
                "the migrated guest ends with the same memory as the uninterrupted one")
        print("KVM: guest continued in a second VM from saved state")
    }
}

@Suite struct KVMVMMWriteTests {
    @Test func vmmWritesAreInTheDirtyLog() throws {
        guard kvmUsable() else { return }
        let vm = try KVMVM(system: try KVMSystem())
        let mem = try HostMemory(size: 4 << 20, backing: .pages4K)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem, logDirty: true)
        let data = [UInt8](repeating: 7, count: 5000)
        try data.withUnsafeBytes { try vm.writeGuest(GPA(0x20_0F00), $0) }
        var pages: [UInt64] = []
        forEachSetBit(try vm.getDirtyLog(slot: 0)) { pages.append($0) }
        #expect(pages == [0x200, 0x201, 0x202])
        #expect(mem.pointer.load(fromByteOffset: 0x20_1000, as: UInt8.self) == 7)
        #expect(throws: KVMError.self) { try data.withUnsafeBytes { try vm.writeGuest(GPA(4 << 20), $0) } }
        print("KVM: VMM writes recorded")
    }
}

@Suite struct KVMTimeoutTests {
    /// A guest that spins without ever exiting is stopped by the run's timeout.
    @Test func silentGuestIsStoppedByTheTimeout() throws {
        guard kvmUsable() else { return }
        let vm = try KVMVM(system: try KVMSystem())
        let mem = try HostMemory(size: 4 << 20, backing: .pages4K)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem)
        let spin: [UInt8] = [0xEB, 0xFE]   // jmp $
        spin.withUnsafeBytes { (mem.pointer + Int(X86Layout.code.raw)).copyMemory(from: $0.baseAddress!, byteCount: 2) }
        let vcpu = try vm.createVCPU(id: 0)
        try vcpu.enterLongModeUser(memory: mem, entry: X86Layout.code)
        let t0 = Date()
        #expect(throws: KVMError.self) { _ = try vcpu.runWorkload(index: 0, memory: mem, timeout: 0.3) }
        let took = Date().timeIntervalSince(t0)
        #expect(took < 5, "the timeout must fire (took \(took) s)")
        print("KVM: a silent guest was stopped after \(String(format: "%.2f", took)) s")
    }
}

@Suite struct KVMManualProtectTests {
    /// Manual protect with initially-all-set: the first get reports every page; after a clear, only
    /// pages the guest writes are reported, and a get does not re-protect until the next clear.
    @Test func initiallySetThenClearThenOnlyWrittenPages() throws {
        guard kvmUsable() else { return }
        let vm = try KVMVM(system: try KVMSystem())
        try vm.enableManualProtect(initiallySet: true)
        let mem = try HostMemory(size: 4 << 20, backing: .pages4K)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem, logDirty: true)
        let all = try vm.getDirtyLog(slot: 0)
        #expect(all.reduce(0) { $0 + $1.nonzeroBitCount } == 1024, "initially all set")
        try vm.clearDirtyLog(slot: 0, firstPage: 0, bitmap: all)
        let vcpu = try vm.createVCPU(id: 0)
        let spec = WorkloadSpec(pattern: .uniform, base: X86Layout.reservedEnd, workingSet: 1 << 20, writeFraction: 1,
                                accessSize: 8, seed: 2, stop: .count(100))
        try vcpu.loadWorkload(spec, index: 0, memory: mem)
        _ = try vcpu.runWorkload(index: 0, memory: mem, timeout: 30)
        var written = Set<UInt64>()
        var g = WorkloadGenerator(spec: spec, vcpu: 0)
        for _ in 0..<100 { written.insert(g.next().gpa.raw >> 12) }
        var reported = Set<UInt64>()
        forEachSetBit(try vm.getDirtyLog(slot: 0)) { if $0 >= 256 { reported.insert($0) } }
        #expect(reported == written)
        print("KVM: manual protect with initially-set, \(reported.count) pages")
    }
}

/// Whether /dev/kvm can be used here; if not, says so loudly (.ci/run fails on it where /dev/kvm exists).
func kvmUsable() -> Bool {
    if case let .failure(e) = KVMSystem.availability() {
        print("KVM TESTS SKIPPED: \(e)")
        return false
    }
    return true
}
