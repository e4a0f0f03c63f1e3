import ArgumentParser
import Foundation
import DirtyLog
import GuestMemory
import KVMBackend
import SoftBackend
import Stage2
import Synchronization
import Workload

/// `vmm bench dirty-log`: the KVM selftest dirty_log_perf_test's phases on the soft backend.
struct BenchDirtyLog: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dirty-log",
        abstract: "Time enable, dirty pass, get, clear and disable of dirty logging, per strategy, against a no-MMU floor."
    )

    @Option(help: "Backend: soft (our MMU) or kvm (/dev/kvm; strategy wp = KVM's dirty bitmap).")
    var backend: String = "soft"
    @Option(help: "Guest memory (e.g. 1G).")
    var memory: ByteSize = ByteSize(argument: "1G")!
    @Option(help: "vCPUs sharing the dirty pass.")
    var vcpus: Int = 1
    @Option(help: "Host backing: 4k, thp, hugetlb, hugetlb1g, memfd.")
    var backing: Backing = .pages4K
    @Option(help: "wp, eager-split, block, dbm, ring, or all.")
    var strategy: String = "all"
    @Option(help: "Iterations per strategy.")
    var iterations: Int = 5
    @Flag(help: "Print one JSON line per strategy.")
    var json = false

    func validate() throws {
        guard backend == "soft" || backend == "kvm" else { throw ValidationError("--backend is soft or kvm") }
        if backend == "kvm" && !["all", "wp", "ring"].contains(strategy) {
            throw ValidationError("the kvm backend measures wp (KVM's dirty bitmap with manual protect) and ring (KVM's dirty ring); the other strategies are the soft MMU's")
        }
        if backend == "kvm" && vcpus != 1 { throw ValidationError("the kvm backend bench runs one vCPU") }
        guard strategy == "all" || DirtyStrategy(rawValue: strategy) != nil else {
            throw ValidationError("--strategy is one of \(DirtyStrategy.allCases.map(\.rawValue).joined(separator: ", ")) or all")
        }
        guard (1...64).contains(vcpus) else { throw ValidationError("--vcpus must be 1...64") }
        guard iterations >= 1 else { throw ValidationError("--iterations must be at least 1") }
        guard memory.bytes % (2 << 20) == 0 else { throw ValidationError("--memory must be a multiple of 2 MiB") }
    }

    func run() throws {
        Output.json = json
        let pages = memory.bytes >> 12
        say("bench dirty-log: \(backend) backend, \(memory) \(backing), \(vcpus) vCPU(s), \(iterations) iterations, manual protect (rings: harvest and reset)")
        if backend == "kvm" {
            for s in strategy == "all" ? ["wp", "ring"] : [strategy] { try runKVM(pages: pages, ring: s == "ring") }
            return
        }
        let strategies = strategy == "all" ? DirtyStrategy.allCases : [DirtyStrategy(rawValue: strategy)!]
        for s in strategies {
            try runStrategy(s, pages: pages)
        }
    }

    struct Phases {
        var populate = 0.0, enable = 0.0, pass = 0.0, get = 0.0, clear = 0.0, disable = 0.0
        var reported = 0
        var splitTables = 0
        static func + (a: Phases, b: Phases) -> Phases {
            Phases(populate: a.populate + b.populate, enable: a.enable + b.enable, pass: a.pass + b.pass,
                   get: a.get + b.get, clear: a.clear + b.clear, disable: a.disable + b.disable,
                   reported: a.reported + b.reported, splitTables: a.splitTables + b.splitTables)
        }
    }

    private func runStrategy(_ s: DirtyStrategy, pages: UInt64) throws {
        let vm = SoftVM(vcpus: vcpus, ringCapacity: 65536)
        let mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: memory.bytes, backing: backing)
        let mmu = vm.mmu
        // A full ring exits to the VMM, which harvests and resets, as a KVM VMM does on
        // KVM_EXIT_DIRTY_RING_FULL; those entries count as reported.
        let ringReported = Counter()
        for v in vm.vcpus {
            v.exitHandler = { exit in
                if case .dirtyRingFull = exit {
                    ringReported.add(mmu.harvestDirtyRings().count)
                    mmu.resetDirtyRings()
                }
                // (Runs on the vCPU thread, outside guest mode, as a KVM VMM's vCPU loop would.)
                return ~0
            }
        }
        // Populate: the first guest pass maps every page (and takes the host's first-touch faults).
        let populate = timeMs { dirtyPass(vm, pages: pages, value: 1) }
        let floor = floorPass(mem, pages: pages)

        say("")
        say("strategy \(s):")
        say("  iter   populate     enable       pass   ns/page        get      clear    disable   reported")
        var total = Phases()
        // Touched once here: on these hosts a first touch of fresh memory costs more than the harvest.
        var entries = [DirtyRingEntry](repeating: DirtyRingEntry(slot: 0, page: 0), count: Int(pages))
        entries.removeAll(keepingCapacity: true)
        for i in 1...iterations {
            var p = Phases()
            p.populate = populate
            p.enable = try timeMs { try mmu.enableDirtyLogging(slot: 0, DirtyLogConfig(strategy: s, manualProtect: s != .ring)) }
            ringReported.reset()
            p.pass = timeMs { dirtyPass(vm, pages: pages, value: UInt64(i + 1)) }
            var bitmap: [UInt64] = []
            entries.removeAll(keepingCapacity: true)
            if s == .ring {
                p.get = timeMs { mmu.harvestDirtyRings(into: &entries) }
                p.clear = timeMs { mmu.resetDirtyRings() }
                p.reported = entries.count + ringReported.value
            } else {
                p.get = try timeMs { bitmap = try mmu.getDirtyLog(slot: 0) }
                p.clear = try timeMs { try mmu.clearDirtyLog(slot: 0, firstPage: 0, bitmap: bitmap) }
                p.reported = bitmap.reduce(0) { $0 + $1.nonzeroBitCount }
            }
            p.splitTables = mmu.dirtyLog(slot: 0)?.splitTablesUsed ?? 0
            p.disable = try timeMs { try mmu.disableDirtyLogging(slot: 0) }
            say(row(String(i), p, pages: pages))
            total = total + p
            // Map everything again (blocks where the backing allows), untimed, so iterations match.
            dirtyPass(vm, pages: pages, value: 1)
        }
        report(s.rawValue, total: total, floor: floor, pages: pages, eagerSplit: s == .eagerSplit)
    }

    /// The mean row, the summary line and the JSON line: the same for both backends.
    private func report(_ strategyName: String, total: Phases, floor: Double, pages: UInt64, eagerSplit: Bool) {
        let n = Double(iterations)
        let mean = Phases(populate: total.populate / n, enable: total.enable / n, pass: total.pass / n,
                          get: total.get / n, clear: total.clear / n, disable: total.disable / n,
                          reported: total.reported / iterations, splitTables: total.splitTables / iterations)
        say(row("mean", mean, pages: pages))
        let perPage = { (ms: Double) in ms * 1e6 / Double(pages) }
        say(String(format: "  dirty pass %.1f ns/page vs floor %.1f ns/page (no MMU): +%.1f ns, %.2fx; get+clear %.2f ms per GiB",
                     perPage(mean.pass), floor, perPage(mean.pass) - floor, perPage(mean.pass) / floor,
                     (mean.get + mean.clear) / (Double(memory.bytes) / Double(1 << 30))))
        if eagerSplit { say("  eager split used \(mean.splitTables) tables (\(formatBytes(UInt64(mean.splitTables) * 4096))) from the pre-filled cache") }
        if json {
            printJSON(jsonLine([
                ("bench", "dirty-log"), ("backend", backend), ("strategy", strategyName), ("backing", backing.rawValue),
                ("gib", Double(memory.bytes) / Double(1 << 30)), ("vcpus", vcpus), ("iterations", iterations),
                ("populate_ms", mean.populate), ("enable_ms", mean.enable), ("dirty_pass_ms", mean.pass),
                ("get_log_ms", mean.get), ("clear_log_ms", mean.clear), ("disable_ms", mean.disable),
                ("dirty_pass_ns_per_page", perPage(mean.pass)), ("floor_ns_per_page", floor),
                ("get_log_ns_per_page", perPage(mean.get)), ("clear_log_ns_per_page", perPage(mean.clear)),
                ("enable_ns_per_page", perPage(mean.enable)), ("disable_ns_per_page", perPage(mean.disable)),
                ("pages_written", pages), ("pages_reported", mean.reported),
                ("split_tables_used", mean.splitTables),
            ]))
        }
    }

    /// The same phases on /dev/kvm: KVM's write-protect dirty log with manual protect
    /// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), the guest program writing one word per page.
    private func runKVM(pages: UInt64, ring wantRing: Bool) throws {
        let kvm = try KVMSystem()
        let vm = try KVMVM(system: kvm)
        var ring = wantRing
        if ring {
            do {
                try vm.enableDirtyRing(bytes: min(1 << 20, Int(kvm.capability(.dirtyLogRing))))
            } catch {
                say("dirty ring unavailable (\(error)); falling back to the dirty bitmap")
                ring = false
            }
        }
        if !ring { try vm.enableManualProtect(initiallySet: false) }
        // The program's own pages sit below 1 MiB; the measured range is everything above.
        let reserved = X86Layout.reservedEnd.raw
        let mem = try HostMemory(size: memory.bytes + reserved, backing: backing)
        let workPages = pages
        let vcpu = try vm.createVCPU(id: 0)
        let spec = WorkloadSpec(pattern: .sequential, base: X86Layout.reservedEnd, workingSet: memory.bytes,
                                writeFraction: 1, accessSize: 8, seed: 1, stop: .count(workPages))
        // With rings, a full ring exits to us: harvest and reset, as a KVM VMM does.
        // Distinct pages harvested from the ring this pass (KVM may log a page more than once).
        var harvested = [UInt64](repeating: 0, count: Int((mem.size >> 12 + 63) / 64))
        func collect() { _ = vcpu.dirtyRing?.harvest { _, page in harvested[Int(page >> 6)] |= 1 << (page & 63) } }
        func reset() throws(KVMError) { try vm.resetDirtyRings() }
        func drain() throws(KVMError) {
            collect()
            try reset()
        }
        func pass() throws {
            try vcpu.loadWorkload(spec, index: 0, memory: mem, pagePass: true)
            _ = try vcpu.runWorkload(index: 0, memory: mem, timeout: 600, onRingFull: drain)
        }
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem)
        let populate = try timeMs { try pass() }
        let floor = floorPass(mem, pages: workPages, offset: reserved)
        say("")
        say(ring ? "strategy ring (KVM dirty ring, \(vcpu.dirtyRing!.entries) entries); \(mem.report())"
                   : "strategy wp (KVM dirty bitmap, manual protect); \(mem.report())")
        say("  iter   populate     enable       pass   ns/page        get      clear    disable   reported")
        var total = Phases()
        for i in 1...iterations {
            var p = Phases()
            p.populate = populate
            p.enable = try timeMs { try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem, logDirty: true) }
            for w in harvested.indices { harvested[w] = 0 }
            p.pass = try timeMs { try pass() }
            if ring {
                p.get = timeMs { collect() }
                p.clear = try timeMs { try reset() }
                var reported = 0
                forEachSetBit(harvested) { if $0 >= reserved >> 12 { reported += 1 } }
                p.reported = reported
            } else {
                var bitmap: [UInt64] = []
                p.get = try timeMs { bitmap = try vm.getDirtyLog(slot: 0) }
                p.clear = try timeMs { try vm.clearDirtyLog(slot: 0, firstPage: 0, bitmap: bitmap) }
                // Reported pages of the measured range (the program's own pages below 1 MiB left out).
                var reported = 0
                forEachSetBit(bitmap) { if $0 >= reserved >> 12 { reported += 1 } }
                p.reported = reported
            }
            p.disable = try timeMs { try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem) }
            say(row(String(i), p, pages: workPages))
            total = total + p
        }
        report(ring ? "ring" : "wp", total: total, floor: floor, pages: workPages, eagerSplit: false)
    }

    private func row(_ name: String, _ p: Phases, pages: UInt64) -> String {
        let f = { (v: Double) in String(format: "%8.2fms", v) }
        return "  " + name.padding(toLength: 4, withPad: " ", startingAt: 0) + " " + [
            f(p.populate), f(p.enable), f(p.pass), String(format: "%9.1f", p.pass * 1e6 / Double(pages)),
            f(p.get), f(p.clear), f(p.disable), String(p.reported).leftPad(10),
        ].joined(separator: " ")
    }

    /// Every vCPU writes one word into each page of its share of memory, through the full access path.
    private func dirtyPass(_ vm: SoftVM, pages: UInt64, value: UInt64) {
        let share = (pages + UInt64(vcpus) - 1) / UInt64(vcpus)
        let vcpus = vm.vcpus
        runOnThreads(vcpus.count) { i in
            let v = vcpus[i]
            let first = UInt64(i) * share
            let last = min(pages, first + share)
            v.enterGuest()
            var p = first
            while p < last {
                v.store(GPA(p << 12), value)
                v.tlb.safePoint()
                p += 1
            }
            v.exitGuest()
        }
    }

    /// The same pass straight into the host mapping, no MMU: ns per page, best of three (the host
    /// is noisy: a stray reclaim or compaction can double one pass).
    private func floorPass(_ mem: HostMemory, pages: UInt64, offset: UInt64 = 0) -> Double {
        let p = mem.pointer + Int(offset)
        var best = Double.infinity
        for _ in 0..<3 {
            let t0 = monotonicNanos()
            for i in 0..<Int(pages) { p.storeBytes(of: UInt64(i), toByteOffset: i << 12, as: UInt64.self) }
            best = min(best, Double(monotonicNanos() - t0) / Double(pages))
        }
        return best
    }
}

/// A thread-safe counter for the ring-full handler.
final class Counter: Sendable {
    private let n = Atomic<Int>(0)
    func add(_ k: Int) { n.add(k, ordering: .relaxed) }
    func reset() { n.store(0, ordering: .relaxed) }
    var value: Int { n.load(ordering: .relaxed) }
}

func timeMs(_ body: () throws -> Void) rethrows -> Double {
    let t0 = monotonicNanos()
    try body()
    return Double(monotonicNanos() - t0) / 1e6
}
