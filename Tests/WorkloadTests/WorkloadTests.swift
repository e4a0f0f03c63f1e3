import Testing
@testable import GuestMemory
@testable import Workload

@Suite struct WorkloadTests {
    @Test func parsesSpecs() throws {
        let s = try WorkloadSpec.parse("pattern=zipf:0.9,ws=16M,write=0.25,size=4,seed=7,count=1000,base=0x100000,rate=5000")
        #expect(s.pattern == .zipfian(theta: 0.9))
        #expect(s.workingSet == 16 << 20 && s.writeFraction == 0.25 && s.accessSize == 4)
        #expect(s.seed == 7 && s.stop == .count(1000) && s.base == GPA(0x10_0000) && s.rate == 5000)
        #expect(try WorkloadSpec.parse("pattern=hotcold:0.2:0.8,duration=500ms").pattern == .hotCold(hotFraction: 0.2, hotProbability: 0.8))
        #expect(try WorkloadSpec.parse("duration=2s").stop == .duration(2))
        // The description parses back to the same spec.
        #expect(try WorkloadSpec.parse(s.description) == s)
        // Also for working sets that are no round number of MiB (the stream carries the description).
        for ws: UInt64 in [3 << 30, (3 << 30) - (1 << 20), (1 << 30) + 4096, 12 << 10] {
            let t = WorkloadSpec(workingSet: ws)
            #expect(try WorkloadSpec.parse(t.description) == t, "\(t)")
        }
    }

    @Test func rejectsBadSpecs() {
        for bad in ["pattern=wave", "ws=12", "write=1.5", "size=3", "count=0", "seed=-1", "nonsense", "foo=1",
                    "pattern=zipf:abc", "base=0x1001", "rate=0", "pattern=hotcold:2"] {
            #expect(throws: WorkloadError.self, "\(bad)") { _ = try WorkloadSpec.parse(bad) }
        }
    }

    @Test func sameSeedSameStreamOtherVCPUOtherStream() {
        let spec = WorkloadSpec(pattern: .uniform, workingSet: 64 << 20, seed: 99)
        var a = WorkloadGenerator(spec: spec, vcpu: 0), b = WorkloadGenerator(spec: spec, vcpu: 0)
        var c = WorkloadGenerator(spec: spec, vcpu: 1)
        var differ = 0
        for _ in 0..<1000 {
            let x = a.next()
            #expect(x == b.next())
            if x != c.next() { differ += 1 }
        }
        #expect(differ > 990)
    }

    /// The generator is specified bit for bit (the KVM guest program repeats it): pin its first values.
    @Test func xorshiftStarIsPinned() {
        var g = WorkloadGenerator(spec: WorkloadSpec(seed: 1), vcpu: 0)
        var state: UInt64 = 1 ^ 0x9E37_79B9_7F4A_7C15
        for _ in 0..<5 {
            state ^= state >> 12; state ^= state << 25; state ^= state >> 27
            #expect(g.nextRandom() == state &* 0x2545_F491_4F6C_DD1D)
        }
    }

    @Test func accessesStayInTheWorkingSetAndAreAligned() {
        for pattern in [AccessPattern.sequential, .uniform, .zipfian(theta: 0.99), .hotCold(hotFraction: 0.1, hotProbability: 0.9)] {
            let spec = WorkloadSpec(pattern: pattern, base: GPA(1 << 30), workingSet: 8 << 20, accessSize: 4, seed: 5)
            var g = WorkloadGenerator(spec: spec, vcpu: 2)
            for _ in 0..<50_000 {
                let a = g.next()
                #expect(a.gpa >= spec.base && a.gpa.raw + 4 <= spec.base.raw + spec.workingSet, "\(pattern)")
                #expect(a.gpa.isAligned(to: 4))
            }
        }
    }

    @Test func writeFractionAndSkew() {
        let pages = 1024
        func histogram(_ p: AccessPattern, write: Double = 0.3) -> ([Int], Double) {
            var g = WorkloadGenerator(spec: WorkloadSpec(pattern: p, workingSet: UInt64(pages) << 12, writeFraction: write, seed: 11), vcpu: 0)
            var h = [Int](repeating: 0, count: pages)
            var writes = 0
            let n = 200_000
            for _ in 0..<n {
                let a = g.next()
                h[Int(a.gpa.raw >> 12)] += 1
                if a.isWrite { writes += 1 }
            }
            return (h, Double(writes) / Double(n))
        }
        let (u, wf) = histogram(.uniform)
        #expect(abs(wf - 0.3) < 0.01)
        #expect(u.min()! > 100 && u.max()! < 300)
        let (z, _) = histogram(.zipfian(theta: 0.99))
        #expect(z[0] > 10 * z[100], "zipf: page 0 is far hotter than page 100")
        #expect(z[0] == z.max()!)
        let (hc, _) = histogram(.hotCold(hotFraction: 0.1, hotProbability: 0.9))
        let hot = hc[0..<102].reduce(0, +)
        #expect(abs(Double(hot) / 200_000 - 0.9) < 0.01)
        let (s, zeroWrites) = histogram(.sequential, write: 0)
        #expect(zeroWrites == 0)
        // 8-byte accesses: 512 per page, in page order.
        #expect(s[0] == 512 && s[389] == 512 && s[391] == 0)
    }
}
