import Foundation
import Testing
@testable import GuestMemory
@testable import Workload

/// The pacer both backends' vCPUs use: a throttle slows a paced vCPU by its share, and a vCPU that
/// fell behind (throttled, descheduled, just restored) does not burst to catch up.
@Suite(.serialized) struct PacerTests {
    /// Accesses a vCPU paced at `rate` makes in `seconds` (in batches of 10, as fast as allowed).
    func run(rate: UInt64, seconds: Double, throttle: Int, stallFirst: Double = 0) -> UInt64 {
        let control = RunControl(vcpus: 1)
        control.throttlePercent = throttle
        let start = monotonicNanos()
        var pacer = Pacer(start: start, deadline: .max, rate: rate)
        if stallFirst > 0 { Thread.sleep(forTimeInterval: stallFirst) }
        var done: UInt64 = 0
        let from = monotonicNanos()
        while monotonicNanos() - from < UInt64(seconds * 1e9) {
            done += 10
            pacer.pace(now: monotonicNanos(), done: done, control: control)
        }
        return done
    }

    @Test func throttleSlowsAPacedVCPU() {
        // The most of up to three runs: a loaded host can take the core for part of one, which
        // only lowers a count (the upper bounds, which catch a burst, see every run).
        func most(throttle: Int, atLeast: Double) -> UInt64 {
            var best: UInt64 = 0
            for _ in 0..<3 where Double(best) <= atLeast {
                let n = run(rate: 20_000, seconds: 0.5, throttle: throttle)
                #expect(Double(n) < (throttle == 0 ? 10_000 * 1.1 : 5000 * 1.3), "\(n) accesses at throttle \(throttle)%")
                best = max(best, n)
            }
            return best
        }
        let free = most(throttle: 0, atLeast: 10_000 * 0.9)
        let half = most(throttle: 50, atLeast: 5000 * 0.7)
        print("paced at 20,000/s for 0.5 s: \(free) accesses unthrottled, \(half) throttled by 50%")
        #expect(Double(free) > 10_000 * 0.9 && Double(free) < 10_000 * 1.1)
        #expect(Double(half) > 5000 * 0.7 && Double(half) < 5000 * 1.3, "a 50% throttle leaves about half the accesses")
    }

    @Test func noBurstAfterAStall() {
        // Stalled 300 ms, then 100 ms at 10,000/s: about 1000 accesses and the 10 ms backlog, not 4000.
        let done = run(rate: 10_000, seconds: 0.1, throttle: 0, stallFirst: 0.3)
        print("after a 300 ms stall, 100 ms at 10,000/s: \(done) accesses")
        #expect(done < 1000 + 100 + 300, "the vCPU burst to catch up: \(done) accesses")
    }
}
