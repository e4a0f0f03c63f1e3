import ArgumentParser
import Foundation
import GuestMemory
import SoftBackend
import Stage2

/// `vmm bench nested`: what a nested (L2) guest costs on the soft backend.
struct BenchNested: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nested",
        abstract: "ns per L2 fault, per L2 access (TLB hit, shadow walk), per invalidated rmap entry; rmap bytes per page."
    )

    @Option(help: "L2 memory faulted in (4 KiB pages mapped by L1's table).")
    var memory: ByteSize = ByteSize(argument: "64M")!
    @Option(help: "Accesses timed for the TLB-hit figure.")
    var hits: Int = 20_000_000
    @Flag(help: "Print one JSON line with the results last.")
    var json = false

    func run() throws {
        Output.json = json
        let size = memory.bytes
        let pages = size >> 12
        // L1: RAM at GPA 0 holding L1's table for L2 at 1 MiB and the L2 memory at 64 MiB.
        let l1 = SoftVM(vcpus: 1)
        let l1Memory = try l1.addMemory(slot: 0, gpa: GPA(0), size: size + (64 << 20), backing: .pages4K)
        try l1Memory.populate()
        let table = L1TableBuilder(memory: l1Memory, tablesAt: GPA(1 << 20))
        let l2Base = GPA(64 << 20)
        for p in 0..<pages { table.map(l2: GPA(p << 12), to: l2Base + (p << 12)) }
        // L0 maps L1's memory first, so the L2 figure is the shadow fill alone.
        let v1 = l1.vcpus[0]
        v1.enterGuest()
        for p in stride(from: UInt64(0), to: l1Memory.size, by: 4096) { _ = v1.load(GPA(p)) }
        v1.exitGuest()

        let l2 = try SoftVM(nestedIn: l1, lpid: 1, l1Table: table.root, vcpus: 1)
        let v = l2.vcpus[0], shadow = l2.shadow!
        say("bench nested: soft backend, L2 \(memory) in 4 KiB pages, L1 table in L1 memory")
        v.enterGuest()
        var t0 = monotonicNanos()
        for p in 0..<pages { v.store(GPA(p << 12), p) }
        let faultNs = Double(monotonicNanos() - t0) / Double(pages)
        precondition(v.stats.mapped[0] == pages, "every L2 page must have faulted once")

        var sum: UInt64 = 0
        t0 = monotonicNanos()
        var a: UInt64 = 0
        for _ in 0..<hits {
            sum &+= v.load(GPA(a))
            v.tlb.safePoint()
            a = (a &+ 4096 &+ 8) & 0x3_FFF8
        }
        let hitNs = Double(monotonicNanos() - t0) / Double(hits)
        v.exitGuest()

        var x: UInt64 = 88172645463325252
        let addrs: [GPA] = (0..<65536).map { _ in
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            return GPA((x % pages) << 12)
        }
        let walks = 5_000_000
        t0 = monotonicNanos()
        var i = 0
        for _ in 0..<walks {
            if let t = shadow.translate(addrs[i]) { sum &+= t.leaf.raw }
            i = (i + 1) & 65535
        }
        let walkNs = Double(monotonicNanos() - t0) / Double(walks)

        let census = l1.mmu.nestedRmap(slot: 0)!.census
        let rmapBytesPerPage = Double(census.bytes) / Double(pages)
        t0 = monotonicNanos()
        let handled = l1.mmu.lock.exclusive { l1.mmu.invalidateNested(GPARange(start: l2Base, size: size)) }
        let invalidateNs = Double(monotonicNanos() - t0) / Double(max(handled, 1))
        precondition(shadow.census().leaves[3] == 0, "the invalidation must clear every shadow leaf")

        func row(_ name: String, _ v: Double, _ unit: String) -> String {
            "  " + name.padding(toLength: 40, withPad: " ", startingAt: 0) + String(format: "%10.2f ", v) + unit
        }
        say(row("L2 fault (shadow fill, 4K)", faultNs, "ns/page"))
        say(row("L2 access, TLB hit", hitNs, "ns/access"))
        say(row("L2 shadow walk (TLB miss)", walkNs, "ns/walk"))
        say(row("rmap invalidation", invalidateNs, "ns/entry (\(handled) entries)"))
        say(row("rmap memory", rmapBytesPerPage, "bytes/mapped L2 page (\(census.entries) entries)"))
        withExtendedLifetime(sum) {}
        if json {
            printJSON(jsonLine([
                ("bench", "nested"), ("l2_fault_ns", faultNs), ("l2_tlb_hit_ns", hitNs), ("l2_shadow_walk_ns", walkNs),
                ("rmap_invalidate_ns_per_entry", invalidateNs), ("rmap_bytes_per_page", rmapBytesPerPage),
                ("l2_pages", pages), ("rmap_entries", census.entries),
            ]))
        }
    }
}
