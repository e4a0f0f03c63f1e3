import ArgumentParser
import Foundation
import GuestMemory
import SoftBackend
import Stage2
import Workload

/// `vmm bench translate`: the cost of each step of a guest access on the soft backend.
struct BenchTranslate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "translate",
        abstract: "ns per access on a TLB hit, per walk (4K/2M/1G leaves), per 4 KiB fault-in; table memory."
    )

    @Option(help: "Accesses timed for the TLB-hit figure.")
    var hits: Int = 50_000_000
    @Option(help: "Walks timed per leaf size.")
    var walks: Int = 5_000_000
    @Option(help: "Memory faulted in for the fault-in figure.")
    var faultMemory: ByteSize = ByteSize(argument: "256M")!
    @Flag(help: "Print one JSON line with the results last.")
    var json = false

    func run() throws {
        Output.json = json
        say("bench translate: soft backend, 1 vCPU on the calling thread")
        let hit = try tlbHit()
        say(row("TLB hit (8-byte load)", hit, "ns/access"))
        var walkNs: [Double] = [], chainedNs: [Double] = []
        var tableBytes: [UInt64] = []
        for size in PageSize.allCases {
            let (ns, chained, bytes) = try walk(size)
            walkNs.append(ns)
            chainedNs.append(chained)
            tableBytes.append(bytes)
            say(row("walk, \(size) leaves, 1 GiB mapped", ns, "ns/walk"))
            say(row("  chained (each waits on the last)", chained, "ns/walk"))
        }
        let (fault, touch) = try faultIn()
        say(row("fault-in 4K (host page present)", fault, "ns/page"))
        say(row("host first touch 4K (no MMU)", touch, "ns/page"))
        for (size, b) in zip(PageSize.allCases, tableBytes) {
            say("  " + "table memory per GiB, \(size) leaves".padding(toLength: 40, withPad: " ", startingAt: 0)
                  + formatBytes(b).leftPad(12))
        }
        if json {
            printJSON(jsonLine([
                ("bench", "translate"), ("tlb_hit_ns", hit),
                ("walk_ns_4k", walkNs[0]), ("walk_ns_2m", walkNs[1]), ("walk_ns_1g", walkNs[2]),
                ("walk_chained_ns_4k", chainedNs[0]), ("walk_chained_ns_2m", chainedNs[1]), ("walk_chained_ns_1g", chainedNs[2]),
                ("fault_in_ns_4k", fault), ("host_first_touch_ns_4k", touch),
                ("table_bytes_per_gib_4k", tableBytes[0]), ("table_bytes_per_gib_2m", tableBytes[1]),
                ("table_bytes_per_gib_1g", tableBytes[2]),
            ]))
        }
    }

    private func row(_ name: String, _ v: Double, _ unit: String) -> String {
        "  " + name.padding(toLength: 40, withPad: " ", startingAt: 0) + String(format: "%10.2f ", v) + unit
    }

    /// Loads cycling over 64 pages, all resident in the TLB, through the vCPU's full access path.
    private func tlbHit() throws -> Double {
        let vm = SoftVM(vcpus: 1)
        try vm.addMemory(slot: 0, gpa: GPA(0), size: 1 << 20, backing: .pages4K)
        let v = vm.vcpus[0]
        v.enterGuest()
        defer { v.exitGuest() }
        for p in 0..<64 { v.store(GPA(UInt64(p) << 12), UInt64(p)) }
        var sum: UInt64 = 0
        let n = hits
        let t0 = monotonicNanos()
        var a: UInt64 = 0
        for _ in 0..<n {
            sum &+= v.load(GPA(a))
            v.tlb.safePoint()
            a = (a &+ 4096 &+ 8) & 0x3_FFF8
        }
        let ns = Double(monotonicNanos() - t0) / Double(n)
        precondition(v.stats.tlbHits >= UInt64(n), "TLB-hit bench missed the TLB")
        blackHole(sum)
        return ns
    }

    /// Hardware walks at random addresses over 1 GiB mapped with leaves of `size`: as a stream of
    /// independent TLB misses (the CPU overlaps them), and chained, each address depending on the
    /// previous walk's result (pure latency).
    private func walk(_ size: PageSize) throws -> (ns: Double, chainedNs: Double, tableBytes: UInt64) {
        let mmu = Stage2MMU()
        let mem = try HostMemory(size: 1 << 30, backing: .pages4K, alignment: 1 << 30)
        try mmu.addSlot(id: 0, gpa: GPA(0), size: mem.size, memory: mem)
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 1 << 30), to: mem.base, size: size, permissions: .all, cache: &cache)
        let tableBytes = mmu.census().tableBytes
        var gen = WorkloadGenerator(spec: WorkloadSpec(pattern: .uniform, workingSet: 1 << 30, seed: 3), vcpu: 0)
        let count = 1 << 16
        let addrs = (0..<count).map { _ in gen.next().gpa }
        var sum: UInt64 = 0
        let t0 = monotonicNanos()
        var i = 0
        for _ in 0..<walks {
            if let t = mmu.translate(addrs[i]) { sum &+= t.hostPage(for: addrs[i]).raw }
            i = (i &+ 1) & (count - 1)
        }
        let ns = Double(monotonicNanos() - t0) / Double(walks)
        let t1 = monotonicNanos()
        i = 0
        for _ in 0..<walks {
            let leaf = mmu.translate(addrs[i])?.leaf.raw ?? 0
            // VALID is bit 0 and always set: the next index depends on this walk's result.
            i = (i &+ Int(truncatingIfNeeded: leaf & 1)) & (count - 1)
        }
        let chained = Double(monotonicNanos() - t1) / Double(walks)
        blackHole(sum &+ UInt64(i))
        cache.drain()
        return (ns, chained, tableBytes)
    }

    /// Faults in every 4 KiB page of host memory that is already populated, so the figure is the
    /// stage-2 fault path alone; then the host's own first-touch cost on fresh memory, for contrast.
    private func faultIn() throws -> (faultNs: Double, touchNs: Double) {
        let size = faultMemory.bytes
        let vm = SoftVM(vcpus: 1)
        let mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: size, backing: .pages4K)
        try mem.populate()
        let v = vm.vcpus[0]
        v.enterGuest()
        let pages = size >> 12
        let t0 = monotonicNanos()
        for p in 0..<pages { v.store(GPA(p << 12), p) }
        let faultNs = Double(monotonicNanos() - t0) / Double(pages)
        v.exitGuest()
        precondition(v.stats.mapped[0] == pages, "fault-in bench: expected \(pages) 4K faults, got \(v.stats.mapped[0])")

        let fresh = try HostMemory(size: size, backing: .pages4K)
        let p = fresh.pointer
        let t1 = monotonicNanos()
        var off = 0
        while off < Int(size) { p.storeBytes(of: UInt8(1), toByteOffset: off, as: UInt8.self); off += 4096 }
        let touchNs = Double(monotonicNanos() - t1) / Double(pages)
        return (faultNs, touchNs)
    }
}

@inline(never) func blackHole<T>(_ x: T) { withExtendedLifetime(x) {} }
