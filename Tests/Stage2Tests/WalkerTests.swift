import Testing
@testable import GuestMemory
@testable import Stage2

/// Records every valid leaf the walker hands it.
struct RecordingVisitor: Stage2Visitor {
    var leaves: [(GPA, Int)] = []
    var posts: [(GPA, Int)] = []
    var visitPoints: VisitPoints { [.leaf, .tablePost] }
    mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        if ctx.old.isValid { leaves.append((ctx.addr, ctx.level)) }
        return .proceed
    }
    mutating func visitTablePost(_ ctx: VisitContext) -> VisitResult {
        posts.append((ctx.addr, ctx.level))
        return .proceed
    }
}

/// A 2 GiB host mapping aligned to 1 GiB, so every leaf size can map it.
func makeMMU(ipaBits: Int = 48) throws -> (Stage2MMU, HostMemory) {
    let mmu = Stage2MMU(ipaBits: ipaBits)
    let mem = try HostMemory(size: 2 << 30, backing: .pages4K, alignment: 1 << 30)
    return (mmu, mem)
}

@Suite struct WalkerTests {
    @Test func visitsExactlyTheLeavesOfARangeAcrossLevelBoundaries() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        // 4K pages straddling the 1 GiB boundary, a 2M block, and a 1G block beyond.
        let g1 = UInt64(1 << 30)
        var expected: [(UInt64, Int)] = []
        for p in stride(from: g1 - 16 * 4096, to: g1 + 16 * 4096, by: 4096) {
            mmu.map(GPARange(start: GPA(p), size: 4096), to: mem.base + p, size: .size4K, permissions: .all, cache: &cache)
            expected.append((p, 3))
        }
        mmu.map(GPARange(start: GPA(g1 + (4 << 20)), size: 2 << 20), to: mem.base + (4 << 20),
                size: .size2M, permissions: .all, cache: &cache)
        expected.append((g1 + (4 << 20), 2))
        mmu.map(GPARange(start: GPA(4 * g1), size: g1), to: mem.base, size: .size1G, permissions: .read, cache: &cache)
        expected.append((4 * g1, 1))

        func leaves(_ lo: UInt64, _ hi: UInt64) -> [(UInt64, Int)] {
            var v = RecordingVisitor()
            mmu.lock.shared { _ = mmu.walk(GPARange(start: GPA(lo), end: GPA(hi)), shared: true, &v) }
            return v.leaves.map { ($0.0.raw, $0.1) }
        }
        func want(_ lo: UInt64, _ hi: UInt64) -> [(UInt64, Int)] {
            expected.filter { e in
                let size = Stage2Geometry.entrySize(e.1)
                return e.0 < hi && e.0 + size > lo
            }
        }
        let cases: [(UInt64, UInt64)] = [
            (0, 1 << 48), (g1 - 5 * 4096, g1 + 3 * 4096), (g1, g1 + 1), (g1 - 1, g1),
            (g1 + (5 << 20), g1 + (5 << 20) + 1), (g1 + 16 * 4096, g1 + (4 << 20)),
            (3 * g1, 5 * g1), (4 * g1 + 123, 4 * g1 + 124), (g1 - 16 * 4096, 5 * g1),
        ]
        for (lo, hi) in cases {
            let got = leaves(lo, hi), exp = want(lo, hi)
            #expect(got.map(\.0) == exp.map(\.0), "range [\(lo), \(hi))")
            #expect(got.map(\.1) == exp.map(\.1), "levels in range [\(lo), \(hi))")
        }
        cache.drain()
    }

    @Test func postVisitsEachTableOnceOnTheWayUp() throws {
        let (mmu, mem) = try makeMMU(ipaBits: 39)
        var cache = TableCache(allocator: mmu.allocator)
        // Two 4K pages in different 2M regions of the same 1G region.
        mmu.map(GPARange(start: GPA(0x1000), size: 4096), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        mmu.map(GPARange(start: GPA(0x40_0000), size: 4096), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        var v = RecordingVisitor()
        mmu.lock.shared { _ = mmu.walk(GPARange(start: GPA(0), end: GPA(1 << 39)), shared: true, &v) }
        #expect(v.leaves.map(\.0.raw) == [0x1000, 0x40_0000])
        // Level-2 tables at 0 and 4M, then the level-1 entry holding both.
        #expect(v.posts.map(\.0.raw) == [0, 0x40_0000, 0])
        #expect(v.posts.map(\.1) == [2, 2, 1])
        cache.drain()
    }

    @Test func stopEndsTheWalk() throws {
        let (mmu, mem) = try makeMMU()
        var cache = TableCache(allocator: mmu.allocator)
        mmu.map(GPARange(start: GPA(0), size: 64 * 4096), to: mem.base, size: .size4K, permissions: .all, cache: &cache)
        var v = LeafLookupVisitor()
        let finished = mmu.lock.shared { mmu.walk(GPARange(start: GPA(0x5000), size: 1 << 20), shared: true, &v) }
        #expect(!finished)
        #expect(v.leaf?.output == mem.base + 0x5000)
        cache.drain()
    }
}
