import Foundation
import Synchronization
import Testing
import DirtyLog
@testable import GuestMemory
@testable import SoftBackend
@testable import Stage2
@testable import Workload

/// The no-lost-dirty-page invariant. vCPU threads write increasing sequence numbers into a working
/// set while a harvester repeatedly collects dirty pages and copies them into a shadow buffer. At the
/// end, with the vCPUs paused and one final harvest, the shadow must equal guest memory byte for byte.
@Suite(.serialized) struct DirtyLogStressTests {
    struct Case: CustomStringConvertible, Sendable {
        var strategy: DirtyStrategy
        var backing: Backing
        var manual: Bool
        var description: String { "\(strategy)/\(backing)\(manual ? "/manual" : "")" }
    }

    static let cases: [Case] = DirtyStrategy.allCases.flatMap { s in
        [Backing.pages4K, .thp, .hugetlb2M].flatMap { b in (s == .ring ? [false] : [false, true]).map { Case(strategy: s, backing: b, manual: $0) } }
    }

    @Test(arguments: cases)
    func shadowCopyEqualsGuestMemory(_ c: Case) throws {
        let size: UInt64 = 16 << 20
        let vm = SoftVM(vcpus: 2)
        let mem: HostMemory
        do {
            mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: size, backing: c.backing)
        } catch {
            print("SKIPPED dirty-log stress \(c): \(error)")
            return
        }
        try mem.populate()
        let spec = WorkloadSpec(pattern: .uniform, workingSet: size, writeFraction: 0.8, seed: 9, stop: .duration(60))
        try vm.start(spec)
        Thread.sleep(forTimeInterval: 0.02)   // blocks get mapped before logging starts

        let mmu = vm.mmu
        try mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: c.strategy, manualProtect: c.manual))
        // Everything before this copy is in it; everything after is logged.
        let shadow = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        defer { shadow.deallocate() }
        shadow.copyMemory(from: mem.pointer, byteCount: Int(size))

        func harvestAndCopy() throws -> Int {
            var pages: [UInt64] = []
            if c.strategy == .ring {
                let entries = mmu.harvestDirtyRings()
                mmu.resetDirtyRings()
                pages = entries.map(\.page)
            } else {
                let bitmap = try mmu.getDirtyLog(slot: 0)
                if c.manual { try mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: bitmap) }
                forEachSetBit(bitmap) { pages.append($0) }
            }
            for p in pages {
                (shadow + Int(p << 12)).copyMemory(from: mem.pointer + Int(p << 12), byteCount: 4096)
            }
            return pages.count
        }

        var harvested = 0
        var vmmWrites: UInt64 = 0
        let deadline = monotonicNanos() + 400_000_000
        while monotonicNanos() < deadline {
            harvested += try harvestAndCopy()
            // The VMM writes too, as device emulation would.
            vmmWrites += 1
            var v = vmmWrites | 0xF000_0000_0000_0000
            let gpa = GPA((vmmWrites &* 7919 % (size >> 12)) << 12 + 64)
            try withUnsafeBytes(of: &v) { try mmu.writeGuest(gpa, $0) }
        }
        try vm.pause()
        harvested += try harvestAndCopy()
        let differing = (0..<Int(size >> 12)).filter { p in
            memcmp(shadow + p * 4096, mem.pointer + p * 4096, 4096) != 0
        }.count
        try vm.resume()
        let stats = try vm.stop()
        #expect(differing == 0, "\(c): pages differ from the shadow copy")
        #expect(harvested > 0)
        #expect(stats.reduce(0) { $0 + $1.writes } > 10_000)
        try mmu.disableDirtyLogging(slot: 0)
    }
}
