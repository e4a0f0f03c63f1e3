import Foundation
import Synchronization
import Testing
@testable import GuestMemory

@Suite struct DirtyBitmapTests {
    @Test func layoutIsBitIOfWordW() {
        let b = DirtyBitmap(pages: 200)
        #expect(b.wordCount == 4)
        b.set(0); b.set(63); b.set(64); b.set(199)
        #expect(b.snapshot() == [1 | 1 << 63, 1, 0, 1 << 7])
        var out: [UInt64] = []
        #expect(b.harvest(into: &out) == 4)
        #expect(out == [1 | 1 << 63, 1, 0, 1 << 7])
        #expect(b.count == 0)
        var pages: [UInt64] = []
        forEachSetBit(out) { pages.append($0) }
        #expect(pages == [0, 63, 64, 199])
    }

    @Test func setRange() {
        let b = DirtyBitmap(pages: 300)
        b.set(first: 60, count: 140)
        #expect(b.count == 140)
        #expect(!b.isSet(59) && b.isSet(60) && b.isSet(199) && !b.isSet(200))
        b.set(first: 0, count: 300)
        #expect(b.count == 300)
    }

    /// Writers mark pages while a harvester swaps words out: every mark shows up in exactly one harvest.
    @Test func concurrentMarksAreHarvestedExactlyOnce() {
        let pages: UInt64 = 4096
        let b = DirtyBitmap(pages: pages)
        let perThread = 200_000
        let threads = 2
        let done = Atomic<Int>(0)
        var total = [Int](repeating: 0, count: Int(pages))
        let group = DispatchGroup()
        // Each writer marks page p only after the harvester has taken its previous mark of p, so the
        // number of marks that land equals the number of harvested bits.
        final class Flags: @unchecked Sendable {
            let p: UnsafeMutablePointer<Atomic<Bool>>
            init(_ n: Int) {
                p = .allocate(capacity: n)
                for i in 0..<n { (p + i).initialize(to: Atomic(false)) }
            }
            deinit { p.deallocate() }
        }
        let flags = Flags(Int(pages))
        let pending = flags.p
        let marks = Atomic<Int>(0)
        for t in 0..<threads {
            group.enter()
            Thread {
                let pending = flags.p
                var x = UInt64(t + 1) &* 0x9E37_79B9_7F4A_7C15
                for _ in 0..<perThread {
                    x ^= x >> 12; x ^= x << 25; x ^= x >> 27
                    let p = (x &* 0x2545_F491_4F6C_DD1D) % pages
                    if pending[Int(p)].compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged {
                        b.set(p)
                        marks.add(1, ordering: .relaxed)
                    }
                }
                done.add(1, ordering: .releasing)
                group.leave()
            }.start()
        }
        var harvested = 0
        while true {
            let finished = done.load(ordering: .acquiring) == threads
            var out: [UInt64] = []
            harvested += b.harvest(into: &out)
            forEachSetBit(out) { p in
                total[Int(p)] += 1
                pending[Int(p)].store(false, ordering: .releasing)
            }
            if finished { break }
        }
        group.wait()
        var out: [UInt64] = []
        harvested += b.harvest(into: &out)
        #expect(harvested == marks.load(ordering: .relaxed))
    }
}
