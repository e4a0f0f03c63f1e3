import ArgumentParser
import Foundation
import GuestMemory
import KVMBackend
import SoftBackend
import Stage2
import Workload

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest workload and print its statistics."
    )

    @Option(help: "Backend: soft (our MMU and software vCPUs) or kvm (/dev/kvm, the guest program at CPL3).")
    var backend: String = "soft"
    @OptionGroup var guest: GuestOptions
    @Option(help: "Workload spec, e.g. pattern=zipf:0.99,ws=128M,write=0.3,size=8,seed=7 (ws defaults to all memory).")
    var workload: String = ""
    @Option(help: "How long to run (e.g. 2s); overrides count= in the workload.")
    var duration: Seconds?
    @Flag(help: "Fault in all host memory before the run (MADV_POPULATE_WRITE), as -mem-prealloc does.")
    var prealloc = false
    @Flag(help: "Print one JSON line with the results last.")
    var json = false

    func validate() throws {
        guard backend == "soft" || backend == "kvm" else { throw ValidationError("--backend is soft or kvm") }
        if backend == "kvm" && guest.vcpus > X86Layout.maxVCPUs { throw ValidationError("the kvm backend runs at most \(X86Layout.maxVCPUs) vCPUs") }
    }

    func run() throws {
        if backend == "kvm" { return try runKVM() }
        var spec = try parseWorkload(workload, memory: guest.memory.bytes)
        if let duration { spec.stop = .duration(duration.value) }
        let vm = SoftVM(vcpus: guest.vcpus)
        let mem = try vm.addMemory(slot: 0, gpa: GPA(0), size: guest.memory.bytes, backing: guest.backing)
        if prealloc { try mem.populate() }
        print("soft VM: \(guest.vcpus) vCPUs, \(guest.memory) \(guest.backing) memory")
        print("workload: \(spec)")
        let stats = try vm.run(spec, timeout: runTimeout(spec))
        let report = RunReport(stats: stats, census: vm.mmu.census(), backing: mem.report(),
                               shootdowns: vm.mmu.tlbs.shootdowns)
        report.printRows()
        if json { print(report.json(spec: spec, backend: "soft")) }
    }
}

extension Run {
    /// The same workload on /dev/kvm: the guest program runs it at CPL3 above the 1 MiB it keeps for
    /// itself; a duration runs it in chunks of a million accesses, continuing the same stream.
    func runKVM() throws {
        let reserved = X86Layout.reservedEnd.raw
        guard guest.memory.bytes > reserved else { throw ValidationError("--memory must exceed 1 MiB on the kvm backend") }
        var spec = try parseWorkload(workload, memory: guest.memory.bytes,
                                     defaults: WorkloadSpec(base: X86Layout.reservedEnd, workingSet: guest.memory.bytes - reserved))
        guard spec.base >= X86Layout.reservedEnd else {
            throw ValidationError("on the kvm backend the working set starts at 1 MiB or above (the guest program's pages lie below)")
        }
        if let duration { spec.stop = .duration(duration.value) }
        let kvm = try KVMSystem()
        let vm = try KVMVM(system: kvm)
        let mem = try HostMemory(size: guest.memory.bytes, backing: guest.backing)
        if prealloc { try mem.populate() }
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: mem)
        let n = guest.vcpus
        let vcpus = try (0..<n).map { i throws(KVMError) in try vm.createVCPU(id: Int32(i)) }
        print("kvm VM: \(n) vCPU(s), \(guest.memory) \(guest.backing) memory")
        print("workload: \(spec)")
        // One thread per vCPU; each runs its own stream (seeded by its index) in chunks.
        let results = ResultBox(count: n)
        let timeout = runTimeout(spec)
        let runSpec = spec
        runOnThreads(n) { i in
            var total = KVMRunStats()
            let chunk: UInt64 = 1_000_000
            let start = Date()
            var limit: Double = 0
            if case let .duration(d) = runSpec.stop { limit = d }
            var first = true
            do throws(KVMError) {
                repeat {
                    var part = runSpec
                    if case .duration = runSpec.stop { part.stop = .count(chunk) }
                    try vcpus[i].loadWorkload(part, index: i, memory: mem, continuing: !first)
                    first = false
                    let s = try vcpus[i].runWorkload(index: i, memory: mem, timeout: timeout)
                    total.accesses += s.accesses; total.writes += s.writes; total.exits += s.exits
                    if case .count = runSpec.stop { break }
                } while Date().timeIntervalSince(start) < limit
                total.nanoseconds = UInt64(Date().timeIntervalSince(start) * 1e9)
                results.set(i, .success(total))
            } catch {
                results.set(i, .failure(error))
            }
        }
        var all: [KVMRunStats] = []
        for r in results.values {
            switch r {
            case let .success(s): all.append(s)
            case let .failure(e): throw e
            case nil: throw ValidationError("a vCPU thread ended without a result")
            }
        }
        var total = KVMRunStats()
        for s in all {
            total.accesses += s.accesses; total.writes += s.writes; total.exits += s.exits
            total.nanoseconds = max(total.nanoseconds, s.nanoseconds)
        }
        print("")
        print("vcpu   accesses   rate/s  writes  exits")
        let rows: [(Int, KVMRunStats)] = Array(all.enumerated().map { ($0.offset, $0.element) }) + (n > 1 ? [(-1, total)] : [])
        for (i, s) in rows {
            let secs = Double(max(s.nanoseconds, 1)) / 1e9
            print([(i < 0 ? "all " : String(i).padding(toLength: 4, withPad: " ", startingAt: 0)),
                   compact(Double(s.accesses)).leftPad(10), compact(Double(s.accesses) / secs).leftPad(8),
                   compact(Double(s.writes)).leftPad(7), String(s.exits).leftPad(6)].joined(separator: " "))
        }
        let secs = Double(max(total.nanoseconds, 1)) / 1e9
        print("")
        print("backing: \(mem.report())")
        if json {
            print(jsonLine([
                ("command", "run"), ("backend", "kvm"), ("workload", spec.description), ("vcpus", n),
                ("accesses", total.accesses), ("writes", total.writes), ("accesses_per_sec", Double(total.accesses) / secs),
                ("exits", total.exits), ("huge_fraction", mem.report().hugeFraction),
            ]))
        }
    }
}

/// Parses a workload spec whose working set defaults to (and must fit in) `memory` bytes at GPA 0.
func parseWorkload(_ text: String, memory: UInt64, defaults: WorkloadSpec? = nil) throws -> WorkloadSpec {
    let spec: WorkloadSpec
    do {
        spec = try WorkloadSpec.parse(text, defaults: defaults ?? WorkloadSpec(workingSet: memory))
    } catch {
        throw ValidationError(error.description)
    }
    guard spec.base.raw + spec.workingSet <= memory else {
        throw ValidationError("working set \(formatBytes(spec.workingSet)) at \(spec.base) does not fit in \(formatBytes(memory)) of guest memory")
    }
    return spec
}

/// Generous wall-clock bound for a run, so nothing waits forever.
func runTimeout(_ spec: WorkloadSpec) -> Double {
    switch spec.stop {
    case let .duration(s): return s * 2 + 30
    case let .count(n): return max(60, Double(n) / 1e6 * 10)
    }
}

struct RunReport {
    let stats: [VCPUStats]
    let census: CensusVisitor
    let backing: BackingReport
    let shootdowns: UInt64

    var total: VCPUStats { stats.reduce(VCPUStats(), +) }

    func printRows() {
        print("")
        print("vcpu   accesses   rate/s  writes  tlb-hit   walks  faults  4K/2M/1G mapped  exits  flushes")
        for (i, s) in stats.enumerated() { print(row("\(i)", s)) }
        if stats.count > 1 { print(row("all", total)) }
        print("")
        print("stage-2: \(census.leaves[3]) x 4K, \(census.leaves[2]) x 2M, \(census.leaves[1]) x 1G leaves; tables \(formatBytes(census.tableBytes)); \(shootdowns) TLB shootdowns")
        print("backing: \(backing)")
    }

    private func row(_ name: String, _ s: VCPUStats) -> String {
        let secs = Double(max(s.nanoseconds, 1)) / 1e9
        let hit = s.accesses == 0 ? 0 : Double(s.tlbHits + s.blockTLBHits) / Double(s.accesses) * 100
        let cols: [String] = [
            name.padding(toLength: 4, withPad: " ", startingAt: 0),
            compact(Double(s.accesses)).leftPad(10),
            compact(Double(s.accesses) / secs).leftPad(8),
            compact(Double(s.writes)).leftPad(7),
            String(format: "%.2f%%", hit).leftPad(8),
            compact(Double(s.walks)).leftPad(7),
            compact(Double(s.faults)).leftPad(7),
            "\(s.mapped[0])/\(s.mapped[1])/\(s.mapped[2])".leftPad(16),
            String(s.exits).leftPad(6),
            String(s.tlbFlushes).leftPad(8),
        ]
        return cols.joined(separator: " ")
    }

    func json(spec: WorkloadSpec, backend: String) -> String {
        let t = total
        let secs = Double(max(t.nanoseconds, 1)) / 1e9
        return jsonLine([
            ("command", "run"), ("backend", backend), ("workload", spec.description),
            ("vcpus", stats.count), ("accesses", t.accesses), ("writes", t.writes),
            ("accesses_per_sec", Double(t.accesses) / secs), ("tlb_hits", t.tlbHits), ("block_tlb_hits", t.blockTLBHits), ("walks", t.walks),
            ("faults", t.faults), ("mapped_4k", t.mapped[0]), ("mapped_2m", t.mapped[1]), ("mapped_1g", t.mapped[2]),
            ("exits", t.exits), ("tlb_flushes", t.tlbFlushes), ("shootdowns", shootdowns),
            ("leaves_4k", census.leaves[3]), ("leaves_2m", census.leaves[2]), ("leaves_1g", census.leaves[1]),
            ("table_bytes", census.tableBytes), ("huge_fraction", backing.hugeFraction),
        ])
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
}

/// Per-thread results, filled in by the vCPU threads.
final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [Result<KVMRunStats, KVMError>?]
    init(count: Int) { results = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ r: Result<KVMRunStats, KVMError>) { lock.lock(); results[i] = r; lock.unlock() }
    var values: [Result<KVMRunStats, KVMError>?] { lock.lock(); defer { lock.unlock() }; return results }
}
