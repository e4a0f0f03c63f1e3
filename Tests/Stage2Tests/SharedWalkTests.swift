import Foundation
import Synchronization
import Testing
@testable import GuestMemory
@testable import Stage2

/// Runs `body(thread)` on `n` threads at once and waits for all.
func concurrently(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let group = DispatchGroup()
    for i in 0..<n {
        group.enter()
        Thread {
            body(i)
            group.leave()
        }.start()
    }
    group.wait()
}

@Suite struct SharedWalkTests {
    /// Shared walks update only by compare-and-swap: two walkers incrementing a counter kept in the
    /// descriptor's top bits on the same leaves at the same time lose no increment.
    @Test func concurrentUpdatesInSharedWalksAreNeverLost() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        let range = GPARange(start: GPA(0), size: 2 << 20)
        mmu.map(range, to: mem.base, size: .size4K, permissions: .read, cache: &cache)
        let threads = 2, passes = 2000
        concurrently(threads) { _ in
            for _ in 0..<passes {
                var v = CounterVisitor()
                mmu.lock.shared { _ = mmu.walk(range, shared: true, &v) }
            }
        }
        var lost = 0
        for p in stride(from: UInt64(0), to: range.size, by: 4096) {
            let d = mmu.translate(GPA(p))!.leaf
            if d.raw >> CounterVisitor.shift != UInt64(threads * passes) % 32 { lost += 1 }
            if d.output != mem.base + p || d.permissions != .read { Issue.record("leaf \(p) corrupted: \(d)") }
        }
        #expect(lost == 0, "\(lost) of 512 leaves lost a concurrent update")
        cache.drain()
    }

    /// Many faults at once on one region: tables are installed by compare-and-swap, losers give their
    /// table back, and every page ends up mapped to its own host page with no table leaked.
    @Test func concurrentFaultsBuildOneConsistentTree() throws {
        let mmu = Stage2MMU()
        let mem = try HostMemory(size: 64 << 20, backing: .pages4K)
        try mmu.addSlot(id: 0, gpa: GPA(1 << 40), size: mem.size, memory: mem)
        let pages = mem.size >> 12
        let threads = 4
        concurrently(threads) { t in
            var cache = TableCache(allocator: mmu.allocator)
            var x = UInt64(t + 1) &* 0x9E37_79B9_7F4A_7C15
            for _ in 0..<20_000 {
                x ^= x >> 12; x ^= x << 25; x ^= x >> 27
                let gpa = GPA((1 << 40) + ((x &* 0x2545_F491_4F6C_DD1D) % pages) * 4096)
                while true {
                    if case .mapped = mmu.handleFault(gpa, .write, cache: &cache) { break }
                    if mmu.translate(gpa) != nil { break }
                }
            }
            cache.drain()
        }
        var mapped = 0
        for p in 0..<pages {
            let gpa = GPA((1 << 40) + p * 4096)
            if let t = mmu.translate(gpa) {
                mapped += 1
                if t.hostPage(for: gpa) != mem.base + p * 4096 { Issue.record("page \(p) maps the wrong host page") }
            }
        }
        #expect(mapped > Int(pages) / 2)
        let census = mmu.census()
        #expect(census.leaves[3] == mapped)
        #expect(mmu.allocator.tablesInUse == census.tables.reduce(0, +) + 1, "tables leaked or double-linked")
    }
}

/// Adds one to a 5-bit counter in descriptor bits 59-63 of every leaf, through the walker's update
/// (a compare-and-swap in a shared walk, retried when it loses).
struct CounterVisitor: Stage2Visitor {
    static let shift: UInt64 = 59
    var visitPoints: VisitPoints { .leaf }
    mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        guard ctx.old.isValid else { return .proceed }
        let count = ((ctx.old.raw >> Self.shift) &+ 1) & 31
        let new = Descriptor(raw: (ctx.old.raw & ((1 << Self.shift) - 1)) | (count << Self.shift))
        return ctx.update(new) ? .proceed : .retry
    }
}
