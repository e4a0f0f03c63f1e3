import ArgumentParser
import Foundation
import GuestMemory
import KVMBackend
import VirtualMachine
import SoftBackend
import Stage2
import Workload

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest workload and print its statistics."
    )

    @OptionGroup var guest: GuestOptions
    @Option(help: "Workload spec, e.g. pattern=zipf:0.99,ws=128M,write=0.3,size=8,seed=7 (ws defaults to all memory).")
    var workload: String = ""
    @Option(help: "How long to run (e.g. 2s); overrides count= in the workload.")
    var duration: Seconds?
    @Flag(help: "Fault in all host memory before the run (MADV_POPULATE_WRITE), as -mem-prealloc does.")
    var prealloc = false
    @Flag(help: "Print one JSON line with the results last.")
    var json = false

    func run() throws {
        Output.json = json
        if guest.backend == .kvm { return try runKVM() }
        var spec = try guest.workload(workload)
        if let duration { spec.stop = .duration(duration.value) }
        let vm = SoftVM(vcpus: guest.vcpus)
        let ram = try vm.addRAM(guest.memory.layout, backing: guest.backing)
        if prealloc { try ram.populate() }
        say("soft VM: \(guest.vcpus) vCPUs, \(guest.memory) \(guest.backing) memory")
        say("workload: \(spec)")
        let stats = try vm.run(spec, timeout: runTimeout(spec))
        let report = RunReport(stats: stats, census: vm.mmu.census(), backing: ram.report(),
                               shootdowns: vm.mmu.tlbs.shootdowns)
        report.printRows()
        if json { printJSON(report.json(spec: spec, backend: "soft")) }
    }
}

extension Run {
    /// The same workload on /dev/kvm, through the backend-independent VirtualMachine: the guest
    /// program runs it at CPL3 above the 1 MiB it keeps for itself.
    func runKVM() throws {
        let vm = try guest.makeVM()
        var spec = try guest.workload(workload)
        if let duration { spec.stop = .duration(duration.value) }
        if prealloc { try vm.ram.populate() }
        say("kvm VM: \(vm.vcpuCount) vCPU(s), \(guest.memory) \(guest.backing) memory")
        say("workload: \(spec)")
        let runs = try vm.run(spec, timeout: runTimeout(spec))
        var total = VCPURun()
        for r in runs {
            total.accesses += r.accesses; total.writes += r.writes; total.exits += r.exits
            total.nanoseconds = max(total.nanoseconds, r.nanoseconds)
        }
        say("")
        say("vcpu   accesses   rate/s  writes  exits")
        let rows: [(String, VCPURun)] = runs.enumerated().map { (String($0.offset), $0.element) } + (runs.count > 1 ? [("all", total)] : [])
        for (name, r) in rows {
            let secs = Double(max(r.nanoseconds, 1)) / 1e9
            say([name.padding(toLength: 4, withPad: " ", startingAt: 0), compact(Double(r.accesses)).leftPad(10),
                   compact(Double(r.accesses) / secs).leftPad(8), compact(Double(r.writes)).leftPad(7),
                   String(r.exits).leftPad(6)].joined(separator: " "))
        }
        let report = vm.ram.report()
        say("")
        say("backing: \(report)")
        if json {
            let secs = Double(max(total.nanoseconds, 1)) / 1e9
            printJSON(jsonLine([
                ("command", "run"), ("backend", "kvm"), ("workload", spec.description), ("vcpus", runs.count),
                ("accesses", total.accesses), ("writes", total.writes), ("accesses_per_sec", Double(total.accesses) / secs),
                ("exits", total.exits), ("huge_fraction", report.hugeFraction),
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
        say("")
        say("vcpu   accesses   rate/s  writes  tlb-hit   walks  faults  4K/2M/1G mapped  exits  flushes")
        for (i, s) in stats.enumerated() { say(row("\(i)", s)) }
        if stats.count > 1 { say(row("all", total)) }
        say("")
        say("stage-2: \(census.leaves[3]) x 4K, \(census.leaves[2]) x 2M, \(census.leaves[1]) x 1G leaves; tables \(formatBytes(census.tableBytes)); \(shootdowns) TLB shootdowns")
        say("backing: \(backing)")
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

