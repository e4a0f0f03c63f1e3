import Foundation
import Synchronization
import Testing
@testable import GuestMemory
@testable import SoftBackend
@testable import Stage2

/// vCPUs store each word's own address into it while another thread splits, collapses, protects,
/// unmaps and invalidates the same memory. Every store must land in the host word its GPA maps to:
/// a stale or torn translation would put an address into the wrong word (or lose it).
@Suite(.serialized) struct MMUStressTests {
    @Test(arguments: [Backing.thp, .pages4K])
    func writesLandWhereTheyBelongUnderConcurrentRemapping(backing: Backing) throws {
        let size: UInt64 = 16 << 20
        let vm = SoftVM(vcpus: 2)
        let mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: size, backing: backing)
        let mmu = vm.mmu
        let stop = Atomic<Bool>(false)
        let stores = Atomic<Int>(0)
        let ops = Atomic<Int>(0)
        let group = DispatchGroup()

        for v in vm.vcpus {
            group.enter()
            Thread {
                v.enterGuest()
                var x = UInt64(v.index + 1) &* 0x9E37_79B9_7F4A_7C15
                while !stop.load(ordering: .relaxed) {
                    for _ in 0..<256 {
                        x ^= x >> 12; x ^= x << 25; x ^= x >> 27
                        let gpa = GPA(((x &* 0x2545_F491_4F6C_DD1D) % size) & ~7)
                        v.store(gpa, gpa.raw | 1)
                        v.tlb.safePoint()
                    }
                    // Counted as they go: the disturber runs on until enough stores were made.
                    stores.add(256, ordering: .relaxed)
                }
                v.exitGuest()
                group.leave()
            }.start()
        }

        // The disturber: every operation that changes or removes translations, over random 2 MiB pieces.
        var cache = TableCache(allocator: mmu.allocator)
        var y: UInt64 = 77
        // 1.5 s, and on until enough happened (a loaded host can starve either side), at most 30 s.
        let start = monotonicNanos()
        while monotonicNanos() - start < 1_500_000_000
                || (monotonicNanos() - start < 30_000_000_000 && (ops.load(ordering: .relaxed) <= 100 || stores.load(ordering: .relaxed) <= 100_000)) {
            y ^= y >> 12; y ^= y << 25; y ^= y >> 27
            let block = GPARange(start: GPA((y % (size >> 21)) << 21), size: 2 << 20)
            switch (y >> 32) % 5 {
            case 0: mmu.split(block, to: .size4K, cache: &cache)
            case 1: mmu.collapse(block, maxSize: .size2M)
            case 2:
                mmu.protect(block, clear: Descriptor.write)
                mmu.protect(block, set: Descriptor.write, shared: true)
            case 3: mmu.unmap(GPARange(start: block.start + 0x3000, size: 0x5000))
            default:
                let hva = HVARange(start: mem.base + (block.start.raw + 0x10000), size: 0x10000)
                mmu.invalidateRangeStart(hva)
                mmu.invalidateRangeEnd(hva)
            }
            ops.add(1, ordering: .relaxed)
        }
        stop.store(true, ordering: .relaxed)
        group.wait()
        cache.drain()

        let words = mem.pointer.bindMemory(to: UInt64.self, capacity: Int(size / 8))
        var wrong = 0, written = 0
        for i in 0..<Int(size / 8) {
            let w = words[i]
            if w == 0 { continue }
            written += 1
            if w != UInt64(i * 8) | 1 { wrong += 1 }
        }
        #expect(wrong == 0, "\(wrong) words hold a store meant for another address")
        #expect(written > 10_000 && stores.load(ordering: .relaxed) > 100_000)
        #expect(ops.load(ordering: .relaxed) > 100)
        print("stress \(backing): \(stores.load(ordering: .relaxed)) stores, \(ops.load(ordering: .relaxed)) remapping operations, \(mmu.tlbs.shootdowns) shootdowns")
    }
}
